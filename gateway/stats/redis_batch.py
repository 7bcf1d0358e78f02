"""Redis key layout and the one Lua script that applies a batch exactly once.

Keys (all under the configurable prefix, default "moegw:"; every one expires):
    w:<bucket s>:<route>:<start>   hash, one time bucket of one route (fields: windows.py);
                                   expires when the longest window using it has passed
    cb:<route>                     hash {cf: consecutive failures, lf: last failure unix time}
    routes                         set of route ids anyone has recorded
    u:<YYYY-MM-DD>                 hash, a UTC day's usage; field = JSON [route, model, client,
                                   metric], metric in req/pt/ct/cost (pico-USD); kept
                                   usage_ttl_days after the day ends
    writer:<id>                    the sequence number of the last batch applied for one store
                                   instance (a process), kept writer_ttl_s

Exactly once. A store seals its buffer into a batch numbered seq = 1, 2, 3, ... and sends one
batch at a time, resending the *same* batch (same seq, same contents) until Redis acknowledges
it. The script applies a batch only when seq is above the writer's stored number, and sets that
number in the same atomic step. So a batch whose EXEC succeeded but whose reply was lost (the
connection dropped) is acknowledged as a duplicate on the resend, never applied twice; and one
key per writer replaces a key per batch. The guarantee holds while a lost reply is resolved
within writer_ttl_s (7 days by default) and Redis keeps its data.

All or nothing. The script checks every op before it writes anything (key types, integer
arguments, and that no counter would leave int64) and sets the writer's seq after the last
write, so a batch it cannot apply is refused whole with nothing applied -- Redis never rolls a
script back, so a failure half-way through would otherwise keep part of a batch and, with the
seq already claimed, drop the rest as a "duplicate". What happens to a refused batch:
  * "overflow <key index> <field>": one counter cannot take its increment. Records are clamped
    to plausible sizes (usage.clamp_usage) and seal() caps each aggregated increment at
    MAX_INCREMENT, so this takes a counter already near 2^63; the store then resends the same
    batch (same seq, nothing of it applied) without that one increment (`without_increment`),
    logging an error and counting moegw_stats_batch_increments_dropped_total: the other
    records of the batch are applied, exactly once.
  * anything else (a foreign key of the wrong type in our namespace, READONLY, OOM): retried
    unchanged and dropped after GIVE_UP_REJECTED_S (redis_sync.py).

Redis Cluster: a script may only touch keys of one slot; give the prefix a hash tag
("{moegw}:") so that every key lands in the same slot.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from gateway.stats.pending import PendingDeltas
from gateway.stats.usage import DAY_S, USAGE_FIELDS, day_end, encode_field
from gateway.stats.windows import BucketKey, ttl_s

KEY_SLACK_S = 120  # windows' keys outlive their last use by this much (clock skew, late reads)
CIRCUIT_TTL_S = DAY_S
# One increment of one batch at most: fits int64 with room, so a batch never carries an
# argument HINCRBY cannot parse (reaching it takes ~4.6 million USD of one key in one batch).
MAX_INCREMENT = 2**62
_OVERFLOW = re.compile(r"moegw stats: overflow (\d+) (.*)\Z", re.DOTALL)

# ARGV: seq, writer ttl, then ops. Ops address keys by their index in KEYS:
#   h <key> <n> <field> <incr> ... (n pairs)   x <key> <ttl>   s <key> <member>
#   c <key> <reset 0|1> <trailing> <last failure or ""> <ttl>
# Two passes over the same ops: the first only reads and checks that every write will succeed
# (key types, integer arguments, no counter leaving int64), the second writes; the writer's
# seq is set last. Redis never rolls a script back, so a check failing half-way through the
# writes would leave a partial batch; failing in the first pass leaves nothing.
APPLY_BATCH_LUA = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
if seq <= last then return 0 end
-- far below 2^63 (9.22e18) compared with a double's error there (~1e3): a safe bound
local LIMIT = 9.2e18
local function is_int(text)  -- what HINCRBY / EXPIRE accept: no sign '+', no leading zero
  return #text <= 20 and (text == '0' or string.match(text, '^%-?[1-9]%d*$') ~= nil)
end
local function of_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == want
end
local planned = {}
local function fits(key, index, field, incr)
  if not is_int(incr) then return false end
  local slot = index .. ' ' .. field
  local current = planned[slot]
  if current == nil then
    local raw = redis.call('HGET', key, field) or '0'
    if not is_int(raw) then return false end
    current = tonumber(raw)
  end
  local total = current + tonumber(incr)
  planned[slot] = total
  return total < LIMIT and total > -LIMIT
end
local function refuse(what, index, field)
  return redis.error_reply('moegw stats: ' .. what .. ' ' .. index .. ' ' .. field)
end
for pass = 1, 2 do
  local apply = pass == 2
  local i = 3
  local n = #ARGV
  while i <= n do
    local op = ARGV[i]
    local index = ARGV[i + 1]
    local key = KEYS[tonumber(index)]
    if key == nil then return refuse('bad key', index, '') end
    if op == 'h' then
      local pairs_count = tonumber(ARGV[i + 2])
      if not apply and not of_type(key, 'hash') then return refuse('not a hash', index, '') end
      for j = 0, pairs_count - 1 do
        local name, incr = ARGV[i + 3 + 2 * j], ARGV[i + 4 + 2 * j]
        if apply then
          redis.call('HINCRBY', key, name, incr)
        elseif not fits(key, index, name, incr) then
          return refuse('overflow', index, name)
        end
      end
      i = i + 3 + 2 * pairs_count
    elseif op == 'x' then
      if apply then
        redis.call('EXPIRE', key, ARGV[i + 2])
      elseif not is_int(ARGV[i + 2]) then
        return refuse('bad ttl', index, '')
      end
      i = i + 3
    elseif op == 's' then
      if apply then
        redis.call('SADD', key, ARGV[i + 2])
      elseif not of_type(key, 'set') then
        return refuse('not a set', index, '')
      end
      i = i + 3
    elseif op == 'c' then
      local reset, trailing, lf = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
      if not apply then
        if not of_type(key, 'hash') or not is_int(ARGV[i + 5]) then
          return refuse('not a hash', index, '')
        end
        if reset == '1' then
          if not is_int(trailing) then return refuse('overflow', index, 'cf') end
        elseif not fits(key, index, 'cf', trailing) then
          return refuse('overflow', index, 'cf')
        end
        local current = redis.call('HGET', key, 'lf')
        if (lf ~= '' and tonumber(lf) == nil) or (current and tonumber(current) == nil) then
          return refuse('bad time', index, 'lf')
        end
      else
        if reset == '1' then
          redis.call('HSET', key, 'cf', trailing)
        else
          redis.call('HINCRBY', key, 'cf', trailing)
        end
        if lf ~= '' then
          local current = redis.call('HGET', key, 'lf')
          if (not current) or tonumber(current) < tonumber(lf) then
            redis.call('HSET', key, 'lf', lf)
          end
        end
        redis.call('EXPIRE', key, ARGV[i + 5])
      end
      i = i + 6
    else
      return redis.error_reply('moegw stats: unknown batch op ' .. tostring(op))
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
APPLY_BATCH_SHA = hashlib.sha1(APPLY_BATCH_LUA.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str

    def window(self, route: str, key: BucketKey) -> str:
        return f"{self.prefix}w:{key[0]}:{route}:{key[1]}"

    def circuit(self, route: str) -> str:
        return f"{self.prefix}cb:{route}"

    def routes(self) -> str:
        return f"{self.prefix}routes"

    def usage(self, day: str) -> str:
        return f"{self.prefix}u:{day}"

    def writer(self, writer_id: str) -> str:
        return f"{self.prefix}writer:{writer_id}"


@dataclass(slots=True)
class SealedBatch:
    """A buffer frozen for sending: resent byte for byte until acknowledged."""

    seq: int
    deltas: PendingDeltas
    keys: list[str] = field(default_factory=list)
    args: list[str | int] = field(default_factory=list)


def seal(
    deltas: PendingDeltas,
    *,
    space: KeySpace,
    writer_id: str,
    seq: int,
    writer_ttl_s: float,
    usage_ttl_days: int,
    now: float,
) -> SealedBatch:
    keys: list[str] = [space.writer(writer_id)]
    args: list[str | int] = [seq, max(1, int(writer_ttl_s))]

    def key_index(name: str) -> int:
        keys.append(name)
        return len(keys)  # Lua's KEYS is 1-based

    def hincr(name: str, fields: dict[str, int], ttl: int) -> None:
        index = key_index(name)
        args.extend(["h", index, len(fields)])
        for field_name, increment in fields.items():
            args.extend([field_name, max(-MAX_INCREMENT, min(increment, MAX_INCREMENT))])
        args.extend(["x", index, ttl])

    routes_index = key_index(space.routes()) if deltas.windows or deltas.circuits else 0
    for route in sorted(set(deltas.windows) | set(deltas.circuits)):
        args.extend(["s", routes_index, route])
    if routes_index:
        args.extend(["x", routes_index, DAY_S])
    for route, buckets in deltas.windows.items():
        for key, bucket in buckets.items():
            ttl = ttl_s(key, now)
            fields = bucket.to_fields()
            if ttl > 0 and fields:
                hincr(space.window(route, key), fields, ttl + KEY_SLACK_S)
    for route, delta in deltas.circuits.items():
        last = "" if delta.last_failure_at is None else repr(delta.last_failure_at)
        index = key_index(space.circuit(route))
        args.extend(["c", index, "1" if delta.reset else "0", delta.trailing, last, CIRCUIT_TTL_S])
    by_day: dict[str, dict[str, int]] = {}
    for (day, route, model, client), vector in deltas.usage.items():
        fields = by_day.setdefault(day, {})
        for metric, value in zip(USAGE_FIELDS, vector, strict=True):
            if value:
                fields[encode_field(route, model, client, metric)] = value
    for day, fields in by_day.items():
        ttl = int(day_end(day) + usage_ttl_days * DAY_S - now)
        if ttl > 0 and fields:
            hincr(space.usage(day), fields, ttl)
    return SealedBatch(seq=seq, deltas=deltas, keys=keys, args=args)


def overflowing_increment(error: BaseException) -> tuple[int, str] | None:
    """(key index, field) when the script refused a batch because that counter would overflow;
    None for any other error."""
    match = _OVERFLOW.search(str(error))
    return (int(match.group(1)), match.group(2)) if match else None


def without_increment(batch: SealedBatch, key_index: int, field_name: str) -> SealedBatch:
    """The same batch (same seq, nothing of it applied yet) minus one field's increment."""
    args: list[str | int] = list(batch.args[:2])
    i = 2
    while i < len(batch.args):
        op, index = batch.args[i], batch.args[i + 1]
        if op == "h":
            count = int(batch.args[i + 2])
            pairs = batch.args[i + 3 : i + 3 + 2 * count]
            kept: list[str | int] = []
            for name, increment in zip(pairs[::2], pairs[1::2], strict=True):
                if not (int(index) == key_index and str(name) == field_name):
                    kept.extend([name, increment])
            args.extend([op, index, len(kept) // 2, *kept])
            i += 3 + 2 * count
        elif op == "c":
            trailing = batch.args[i + 3]
            if int(index) == key_index and field_name == "cf":
                trailing = 0  # the failure count stays as it is; the rest of the op applies
            args.extend([op, index, batch.args[i + 2], trailing, *batch.args[i + 4 : i + 6]])
            i += 6
        else:  # x, s
            args.extend(batch.args[i : i + 3])
            i += 3
    return SealedBatch(seq=batch.seq, deltas=batch.deltas, keys=batch.keys, args=args)
