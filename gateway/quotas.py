"""Per-client limits: requests per minute, tokens per minute and a daily USD budget.

    quotas = make_quotas(settings)              # None when no limit is configured (no cost)
    await quotas.check("alice")                 # before the request: RateLimited (429) or None
    quotas.charge(usage)                        # after it is served (accounting's record_usage)

A client is its key's name from GATEWAY_API_KEYS (`name:key`), or the key id of an unnamed key,
or "anonymous" on an open gateway (one shared bucket). Its limits are CLIENT_LIMITS[name], else
the CLIENT_REQUESTS_PER_MIN / CLIENT_TOKENS_PER_MIN / CLIENT_DAILY_BUDGET_USD defaults.

Counters live in Redis when REDIS_URL is set, so every replica enforces the same limit; in
memory otherwise. The minute windows are `limits`' fixed windows (one INCR with expiry per
hit); the budget is a pico-dollar INCRBY per UTC day. Semantics:
- requests/min: every request counts when it arrives; the one over the limit gets 429 with
  Retry-After = the seconds left in the window.
- tokens/min: a request is refused while the window's tokens (prompt + completion of served
  answers) have reached the limit; the answer that crosses it is served and counted in full.
- daily budget: refused while today's spend (usage.cost) has reached it; Retry-After = the
  seconds to the next UTC midnight. Error code `insufficient_quota`, as OpenAI's.
When Redis cannot be reached the check lets the request through (a limit must not take the
gateway down) and logs a warning at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter

from gateway.errors import RateLimited
from gateway.settings import ClientLimit, Settings
from gateway.stats.base import StatsStore, Usage

log = logging.getLogger(__name__)

_PICO = 10**12  # the budget is summed exactly in pico-dollars
_DAY_S = 86_400
_WARN_EVERY_S = 60.0


class BudgetExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class _MemoryLedger:
    def __init__(self) -> None:
        self._spent: dict[str, int] = {}

    async def spent(self, key: str) -> int:
        return self._spent.get(key, 0)

    async def add(self, key: str, amount: int) -> None:
        self._spent[key] = self._spent.get(key, 0) + amount

    async def aclose(self) -> None:
        pass


class _RedisLedger:
    def __init__(self, client: Any, prefix: str):
        self._redis = client
        self._prefix = prefix

    async def spent(self, key: str) -> int:
        value = await self._redis.get(self._prefix + key)
        return int(value) if value is not None else 0

    async def add(self, key: str, amount: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(self._prefix + key, amount)
            pipe.expire(self._prefix + key, 3 * _DAY_S)
            await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight_utc(now: float) -> float:
    return _DAY_S - (now % _DAY_S)


class ClientQuotas:
    def __init__(self, settings: Settings):
        self._settings = settings
        prefix = settings.stats_prefix
        if settings.redis_url:
            from redis.asyncio import Redis

            client = Redis.from_url(settings.redis_url)
            storage: Storage = RedisStorage(
                "async+" + settings.redis_url,
                implementation="redispy",
                key_prefix=f"{prefix}limits",
                # one pool for limits and budget (limits types its options as scalars)
                connection_pool=client.connection_pool,  # type: ignore[arg-type]
            )
            self._ledger: _MemoryLedger | _RedisLedger = _RedisLedger(client, f"{prefix}budget:")
        else:
            storage = MemoryStorage()
            self._ledger = _MemoryLedger()
        self._storage = storage
        self._window = FixedWindowRateLimiter(storage)
        self._items: dict[tuple[str, int], Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = -math.inf
        self.clock = time.time  # tests move the day

    def limit(self, client: str) -> ClientLimit:
        return self._settings.limit_for(client)

    def _item(self, kind: str, amount: int) -> Any:
        item = self._items.get((kind, amount))
        if item is None:
            item = self._items[(kind, amount)] = RateLimitItemPerMinute(amount, namespace=kind)
        return item

    # -- before a request -----------------------------------------------------------------------

    async def check(self, client: str) -> None:
        """RateLimited (429, Retry-After) when the client is over a limit; else None."""
        limit = self.limit(client)
        if limit.unlimited:
            return
        try:
            await self._check(client, limit)
        except RateLimited:
            raise
        except Exception as exc:  # Redis down: let the request through, say so
            self._warn(exc)

    async def _check(self, client: str, limit: ClientLimit) -> None:
        checks = []
        if limit.requests_per_min is not None:
            checks.append(self._requests(client, limit.requests_per_min))
        if limit.tokens_per_min is not None:
            checks.append(self._tokens(client, limit.tokens_per_min))
        if limit.daily_budget_usd is not None:
            checks.append(self._budget(client, limit.daily_budget_usd))
        refusals = [r for r in await asyncio.gather(*checks) if r is not None]
        if refusals:
            raise max(refusals, key=lambda r: r.retry_after or 0.0)  # wait for all of them

    async def _requests(self, client: str, per_min: int) -> RateLimited | None:
        item = self._item("rpm", per_min)
        if await self._window.hit(item, client):
            return None
        return RateLimited(
            f"rate limit reached for {client}: {per_min} requests per minute",
            retry_after=await self._reset_in(item, client),
            code="rate_limit_exceeded",
        )

    async def _tokens(self, client: str, per_min: int) -> RateLimited | None:
        item = self._item("tpm", per_min)
        if await self._window.test(item, client):
            return None
        return RateLimited(
            f"rate limit reached for {client}: {per_min} tokens per minute",
            retry_after=await self._reset_in(item, client),
            code="rate_limit_exceeded",
        )

    async def _budget(self, client: str, budget_usd: float) -> RateLimited | None:
        now = self.clock()
        spent = await self._ledger.spent(f"{client}:{_day(now)}")
        if spent < round(budget_usd * _PICO):
            return None
        return BudgetExceeded(
            f"daily budget of ${budget_usd:g} reached for {client} (resets at 00:00 UTC)",
            retry_after=seconds_to_midnight_utc(now),
        )

    async def _reset_in(self, item: Any, client: str) -> float:
        stats = await self._window.get_window_stats(item, client)
        return max(1.0, stats.reset_time - time.time())

    # -- after a request ------------------------------------------------------------------------

    def charge(self, usage: Usage) -> None:
        """Count a served answer's tokens and cost (runs in the background, off the response)."""
        limit = self.limit(usage.client_key)
        if limit.tokens_per_min is None and limit.daily_budget_usd is None:
            return
        task = asyncio.get_running_loop().create_task(self._charge(usage, limit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, usage: Usage, limit: ClientLimit) -> None:
        try:
            if limit.tokens_per_min is not None:
                tokens = usage.prompt_tokens + usage.completion_tokens
                if tokens > 0:
                    item = self._item("tpm", limit.tokens_per_min)
                    await self._window.hit(item, usage.client_key, cost=tokens)
            if limit.daily_budget_usd is not None and usage.cost_usd > 0:
                day = _day(self.clock())
                await self._ledger.add(f"{usage.client_key}:{day}", round(usage.cost_usd * _PICO))
        except Exception as exc:
            self._warn(exc)

    async def drain(self) -> None:
        """Wait for the charges in flight (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def spent_today(self, client: str) -> float:
        return await self._ledger.spent(f"{client}:{_day(self.clock())}") / _PICO

    async def aclose(self) -> None:
        await self.drain()
        await self._ledger.aclose()
        timer = getattr(self._storage, "timer", None)  # the memory store's expiry task
        if isinstance(timer, asyncio.Task) and not timer.done():
            timer.cancel()

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
