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

Redis Cluster: a script may only touch keys of one slot; give the prefix a hash tag
("{moegw}:") so that every key lands in the same slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gateway.stats.pending import PendingDeltas
from gateway.stats.usage import DAY_S, USAGE_FIELDS, day_end, encode_field
from gateway.stats.windows import BucketKey, ttl_s

KEY_SLACK_S = 120  # windows' keys outlive their last use by this much (clock skew, late reads)
CIRCUIT_TTL_S = DAY_S

# ARGV: seq, writer ttl, then ops. Ops address keys by their index in KEYS:
#   h <key> <n> <field> <incr> ... (n pairs)   x <key> <ttl>   s <key> <member>
#   c <key> <reset 0|1> <trailing> <last failure or ""> <ttl>
APPLY_BATCH_LUA = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
if seq <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local i = 3
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 1])]
  if op == 'h' then
    local pairs_count = tonumber(ARGV[i + 2])
    for j = 0, pairs_count - 1 do
      redis.call('HINCRBY', key, ARGV[i + 3 + 2 * j], ARGV[i + 4 + 2 * j])
    end
    i = i + 3 + 2 * pairs_count
  elseif op == 'x' then
    redis.call('EXPIRE', key, ARGV[i + 2])
    i = i + 3
  elseif op == 's' then
    redis.call('SADD', key, ARGV[i + 2])
    i = i + 3
  elseif op == 'c' then
    if ARGV[i + 2] == '1' then
      redis.call('HSET', key, 'cf', ARGV[i + 3])
    else
      redis.call('HINCRBY', key, 'cf', ARGV[i + 3])
    end
    local lf = ARGV[i + 4]
    if lf ~= '' then
      local current = redis.call('HGET', key, 'lf')
      if (not current) or tonumber(current) < tonumber(lf) then
        redis.call('HSET', key, 'lf', lf)
      end
    end
    redis.call('EXPIRE', key, ARGV[i + 5])
    i = i + 6
  else
    return redis.error_reply('moegw stats: unknown batch op ' .. tostring(op))
  end
end
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
            args.extend([field_name, increment])
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
