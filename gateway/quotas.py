"""Per-client limits: requests per minute, tokens per minute and a daily USD budget.

    quotas = make_quotas(settings)              # None when no limit is configured (no cost)
    await quotas.check("alice")                 # before the request: RateLimited (429) or None
    quotas.charge(usage)                        # after it is served (accounting's record_usage)

A client is its key's name from GATEWAY_API_KEYS (`name:key`), or the key id of an unnamed key,
or "anonymous" on an open gateway (one shared bucket). Its limits are CLIENT_LIMITS[name], else
the CLIENT_REQUESTS_PER_MIN / CLIENT_TOKENS_PER_MIN / CLIENT_DAILY_BUDGET_USD defaults.

Counters live in Redis when REDIS_URL is set, so every replica enforces the same limit; in
memory otherwise. Minute windows are fixed (the key names the minute: every replica agrees on
the window without asking Redis); the budget is summed exactly in pico-dollars per UTC day.
- requests/min: a request is counted when it is admitted; the one over the limit gets 429
  (`rate_limit_exceeded`) with Retry-After = the seconds left in the minute, and is not counted.
- tokens/min: a request is refused while the minute's tokens (prompt + completion of served
  answers) have reached the limit; the answer that crosses it is served and counted in full.
- daily budget: refused while today's spend (usage.cost) has reached it (`insufficient_quota`,
  as OpenAI's), Retry-After = the seconds to the next 00:00 UTC.
One check is one Redis script call (every configured limit at once) and one charge is one more,
off the response path: the `limits` library's strategies cost one round trip per limit (three
with all limits set, ~1.1-1.6 ms per request on our 2-core machines against ~0.27 ms for one
script: bench/client_limits.py). When Redis cannot be reached the check lets the request
through (a limit must not take the gateway down) and logs a warning at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from gateway.errors import RateLimited
from gateway.redis_client import redis_client
from gateway.settings import ClientLimit, Settings
from gateway.stats.base import StatsStore, Usage
from gateway.stats.usage import DAY_S, utc_day

log = logging.getLogger(__name__)

PICO = 10**12  # the budget is summed exactly in pico-dollars
WINDOW_S = 60
_WARN_EVERY_S = 60.0
QUOTA_REDIS_TIMEOUT_S = 1.0  # connect and read: the check is on the request path

# KEYS: requests window, tokens window, budget day. ARGV: request limit, token limit, budget
# (pico-dollars), window TTL; a limit of 0 is not set. Returns {requests, tokens, budget}: 1 for
# each limit that refuses. The reads come first, so a refused request is not counted.
_CHECK = """
local refused_tokens, refused_budget = 0, 0
if ARGV[2] ~= '0' and tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then
  refused_tokens = 1
end
if ARGV[3] ~= '0' and tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[3]) then
  refused_budget = 1
end
if refused_tokens == 1 or refused_budget == 1 or ARGV[1] == '0' then
  return {0, refused_tokens, refused_budget}
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return {1, 0, 0}
end
return {0, 0, 0}
"""

# KEYS: tokens window, budget day. ARGV: tokens, pico-dollars, window TTL, day TTL.
_CHARGE = """
if ARGV[1] ~= '0' then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if ARGV[2] ~= '0' then
  redis.call('INCRBY', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
"""


class BudgetExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


def seconds_to_midnight_utc(now: float) -> float:
    return DAY_S - (now % DAY_S)


class _Keys:
    """The counters of one client at one moment: this minute's windows and today's budget."""

    def __init__(self, prefix: str, client: str, now: float):
        minute = int(now // WINDOW_S)
        self.requests = f"{prefix}quota:rpm:{client}:{minute}"
        self.tokens = f"{prefix}quota:tpm:{client}:{minute}"
        self.budget = f"{prefix}quota:usd:{client}:{utc_day(now)}"
        self.window_left = (minute + 1) * WINDOW_S - now


class _MemoryCounters:
    """The scripts' semantics in this process (no REDIS_URL)."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._expires: dict[str, float] = {}

    def _get(self, key: str, now: float) -> int:
        if self._expires.get(key, math.inf) <= now:
            self._values.pop(key, None)
            self._expires.pop(key, None)
        return self._values.get(key, 0)

    def _add(self, key: str, amount: int, ttl: float, now: float) -> int:
        value = self._get(key, now) + amount
        self._values[key] = value
        self._expires[key] = now + ttl
        if len(self._expires) > 10_000:  # drop what has expired
            for old in [k for k, at in self._expires.items() if at <= now]:
                self._values.pop(old, None)
                self._expires.pop(old, None)
        return value

    async def check(self, keys: _Keys, limits: tuple[int, int, int], now: float) -> list[int]:
        requests, tokens, budget = limits
        refused_tokens = int(bool(tokens) and self._get(keys.tokens, now) >= tokens)
        refused_budget = int(bool(budget) and self._get(keys.budget, now) >= budget)
        if refused_tokens or refused_budget or not requests:
            return [0, refused_tokens, refused_budget]
        if self._get(keys.requests, now) >= requests:
            return [1, 0, 0]
        self._add(keys.requests, 1, 2 * WINDOW_S, now)
        return [0, 0, 0]

    async def charge(self, keys: _Keys, tokens: int, pico: int, now: float) -> None:
        self.add_charge(keys, tokens, pico, now)

    def add_charge(self, keys: _Keys, tokens: int, pico: int, now: float) -> None:
        if tokens > 0:
            self._add(keys.tokens, tokens, 2 * WINDOW_S, now)
        if pico > 0:
            self._add(keys.budget, pico, 3 * DAY_S, now)

    async def get(self, key: str, now: float) -> int:
        return self._get(key, now)

    async def aclose(self) -> None:
        pass


class _RedisCounters:
    def __init__(self, url: str):
        # on the request path: a Redis that stops answering costs a request at most 1 s
        self._redis = redis_client(url, timeout_s=QUOTA_REDIS_TIMEOUT_S)
        self._check = self._redis.register_script(_CHECK)
        self._charge = self._redis.register_script(_CHARGE)

    async def check(self, keys: _Keys, limits: tuple[int, int, int], now: float) -> list[int]:
        args = [*limits, 2 * WINDOW_S]
        result = await self._check([keys.requests, keys.tokens, keys.budget], args)
        return [int(x) for x in result]

    async def charge(self, keys: _Keys, tokens: int, pico: int, now: float) -> None:
        await self._charge([keys.tokens, keys.budget], [tokens, pico, 2 * WINDOW_S, 3 * DAY_S])

    async def get(self, key: str, now: float) -> int:
        value = await self._redis.get(key)
        return int(value) if value is not None else 0

    async def aclose(self) -> None:
        await self._redis.aclose()


class ClientQuotas:
    def __init__(self, settings: Settings):
        self._overrides = dict(settings.client_limits)
        self._default = settings.default_client_limit
        self._prefix = settings.stats_prefix
        self._counters: _MemoryCounters | _RedisCounters = (
            _RedisCounters(settings.redis_url) if settings.redis_url else _MemoryCounters()
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = -math.inf
        self.clock = time.time  # tests move the day

    def limit(self, client: str) -> ClientLimit:
        return self._overrides.get(client, self._default)

    # -- before a request -----------------------------------------------------------------------

    async def check(self, client: str) -> None:
        """RateLimited (429, Retry-After) when the client is over a limit; else None."""
        limit = self.limit(client)
        if limit.unlimited:
            return
        now = self.clock()
        keys = _Keys(self._prefix, client, now)
        budget = limit.daily_budget_usd
        limits = (
            limit.requests_per_min or 0,
            limit.tokens_per_min or 0,
            max(1, round(budget * PICO)) if budget is not None else 0,
        )
        try:
            requests, tokens, spent = await self._counters.check(keys, limits, now)
        except Exception as exc:  # Redis down: let the request through, say so
            self._warn(exc)
            return
        if spent:
            raise BudgetExceeded(
                f"daily budget of ${budget:g} reached for {client} (resets at 00:00 UTC)",
                retry_after=seconds_to_midnight_utc(now),
            )
        if tokens or requests:
            what = (
                f"{limit.tokens_per_min} tokens" if tokens else f"{limit.requests_per_min} requests"
            )
            raise RateLimited(
                f"rate limit reached for {client}: {what} per minute",
                retry_after=keys.window_left,
                code="rate_limit_exceeded",
            )

    # -- after a request ------------------------------------------------------------------------

    def charge(self, usage: Usage) -> None:
        """Count a served answer's tokens and cost (in the background, off the response)."""
        limit = self.limit(usage.client_key)
        tokens = usage.prompt_tokens + usage.completion_tokens
        tokens = tokens if limit.tokens_per_min is not None else 0
        pico = round(usage.cost_usd * PICO) if limit.daily_budget_usd is not None else 0
        if tokens <= 0 and pico <= 0:
            return
        now = self.clock()
        keys = _Keys(self._prefix, usage.client_key, now)
        if isinstance(self._counters, _MemoryCounters):  # no I/O: no task either
            self._counters.add_charge(keys, tokens, pico, now)
            return
        task = asyncio.get_running_loop().create_task(self._charge(keys, tokens, pico, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, keys: _Keys, tokens: int, pico: int, now: float) -> None:
        try:
            await self._counters.charge(keys, max(tokens, 0), max(pico, 0), now)
        except Exception as exc:
            self._warn(exc)

    async def drain(self) -> None:
        """Wait for the charges in flight (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def spent_today(self, client: str) -> float:
        now = self.clock()
        return await self._counters.get(_Keys(self._prefix, client, now).budget, now) / PICO

    async def aclose(self) -> None:
        await self.drain()
        await self._counters.aclose()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("client limits not enforced: store unreachable (%s)", type(exc).__name__)


def make_quotas(settings: Settings) -> ClientQuotas | None:
    return ClientQuotas(settings) if settings.limits_configured else None


class ChargingStats:
    """The stats store as the accountant sees it: each usage record also charges the client's
    quotas, so tokens and spend are counted exactly once, where usage is."""

    def __init__(self, stats: StatsStore, quotas: ClientQuotas):
        self._stats = stats
        self._quotas = quotas

    def record_usage(self, usage: Usage) -> None:
        self._stats.record_usage(usage)
        self._quotas.charge(usage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stats, name)
