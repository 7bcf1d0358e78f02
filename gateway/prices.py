"""Run-time price overrides on top of the catalog: `PriceBook`.

    book = PriceBook(catalog, redis_url=settings.redis_url, prefix=settings.stats_prefix)
    await book.start()                      # first load + background refresh (Redis only)
    book.effective(route) -> (input, output)   # USD per 1M tokens; a dict lookup, never I/O
    book.measured = LocalPriceFeed(...).price  # run-time measured prices (gateway/local_price.py)
    await book.set(route_id, 0.40, 0.45)    # the admin page; visible here before it returns
    await book.clear(route_id)
    await book.history()                    # who changed which price when, newest first

Without Redis the overrides live in this process only. With Redis they live in one hash,
`<prefix>prices` (field = route id, value = JSON {"input", "output", "set_at"}), so every gateway
replica sees them: a replica's own changes are visible locally at once, the others' after the
next background refresh (`refresh_interval_s`). The request path only ever reads the local dict.
A write goes to Redis first and is applied locally only when Redis took it, so a replica never
serves a price the others will not see; a failed write raises `PriceStoreUnavailable`.
Each change is also pushed, in the same MULTI, to a capped list `<prefix>prices:history`
(route, set/clear, the prices, who, when), so the dashboard shows every replica's changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.catalog import Catalog, Route
from gateway.errors import GatewayError, InvalidRequest
from gateway.redis_client import redis_client

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

MAX_PRICE_PER_M = 1_000.0  # USD per 1M tokens; anything above is a typo, not a price
HISTORY_SIZE = 200  # price changes kept (a capped Redis list with Redis, else in memory)


class PriceStoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "price_store_unavailable"


@dataclass(frozen=True, slots=True)
class PriceOverride:
    route_id: str
    input: float  # USD / 1M prompt tokens
    output: float  # USD / 1M completion tokens
    set_at: float  # unix time

    def to_json(self) -> str:
        return json.dumps({"input": self.input, "output": self.output, "set_at": self.set_at})


@dataclass(frozen=True, slots=True)
class PriceChange:
    """One entry of the price history: who set or cleared which route's price, and when."""

    route_id: str
    action: str  # "set" | "clear" (back to the catalog price, given as input/output)
    input: float
    output: float
    by: str  # the admin's name from the session, or "api" for a bearer-token call
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "route_id": self.route_id,
            "action": self.action,
            "input": self.input,
            "output": self.output,
            "by": self.by,
            "at": self.at,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def parse(cls, raw: Any) -> PriceChange | None:
        try:
            d = json.loads(raw)
            return cls(
                str(d["route_id"]),
                str(d["action"]),
                float(d["input"]),
                float(d["output"]),
                str(d["by"]),
                float(d["at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _check_price(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number (USD per 1M tokens)", param=name)
    try:
        price = float(value)
    except OverflowError:  # an integer beyond any float (10**400): out of range like inf
        price = math.inf
    if not math.isfinite(price) or price < 0 or price > MAX_PRICE_PER_M:
        raise InvalidRequest(
            f"{name} must be between 0 and {MAX_PRICE_PER_M:g} USD per 1M tokens", param=name
        )
    return price


class PriceBook:
    def __init__(
        self,
        catalog: Catalog,
        *,
        redis_url: str | None = None,
        prefix: str = "moegw:",
        refresh_interval_s: float = 2.0,
    ):
        self._routes: dict[str, Route] = {route.id: route for route in catalog.routes()}
        self._generation = 0  # bumped whenever the overrides change (see `generation`)
        self._current: dict[str, PriceOverride] = {}
        self._redis_url = redis_url
        self._key = f"{prefix}prices"
        self._history_key = f"{prefix}prices:history"
        self._history: deque[PriceChange] = deque(maxlen=HISTORY_SIZE)
        self._refresh_interval_s = refresh_interval_s
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        # Bumped by every local write: a refresh that started before a write must not
        # overwrite it with the older Redis snapshot it read.
        self._version = 0
        self._refresh_failing = False
        # Prices measured at run time (the local route's, gateway/local_price.py): below an
        # admin override, above the catalog. None for a route without one. `measured_version`
        # counts their changes (it may refresh them: cheap while they are fresh).
        self.measured: Callable[[Route], tuple[float, float] | None] | None = None
        self.measured_version: Callable[[], int] | None = None

    @property
    def generation(self) -> int:
        """Changes whenever an effective price may have: an override, or a measured price (the
        router's cached route facts hold prices and are dropped when this moves)."""
        measured = self.measured_version() if self.measured_version is not None else 0
        return self._generation + measured

    @property
    def shared(self) -> bool:
        """True when overrides are shared through Redis."""
        return self._redis_url is not None

    # -- the request path: local reads only ---------------------------------------------------

    @property
    def _overrides(self) -> dict[str, PriceOverride]:
        return self._current

    @_overrides.setter
    def _overrides(self, value: dict[str, PriceOverride]) -> None:
        if value != getattr(self, "_current", None):  # (a refresh often reads the same prices)
            self._generation += 1  # the router's cached route facts hold prices: now stale
        self._current = value

    def effective(self, route: Route) -> tuple[float, float]:
        override = self._overrides.get(route.id)
        if override is None:
            if self.measured is not None and (measured := self.measured(route)) is not None:
                return measured
            return route.input_price, route.output_price
        return override.input, override.output

    def overrides(self) -> dict[str, PriceOverride]:
        return dict(self._overrides)

    # -- writes (the admin page) --------------------------------------------------------------

    def _check_route(self, route_id: object) -> str:
        if not isinstance(route_id, str) or route_id not in self._routes:
            raise InvalidRequest(f"unknown route {route_id!r}", param="route_id")
        return route_id

    async def set(
        self, route_id: object, input: object, output: object, *, by: str = "api"
    ) -> PriceOverride:
        route_id = self._check_route(route_id)
        override = PriceOverride(
            route_id=route_id,
            input=_check_price("input", input),
            output=_check_price("output", output),
            set_at=time.time(),
        )
        change = PriceChange(route_id, "set", override.input, override.output, by, override.set_at)
        if self._redis_url is not None:
            await self._redis_write("hset", (self._key, route_id, override.to_json()), change)
        self._version += 1
        self._overrides = {**self._overrides, route_id: override}
        self._history.appendleft(change)
        return override

    async def clear(self, route_id: object, *, by: str = "api") -> bool:
        """Back to the catalog price; False when the route had no override."""
        route_id = self._check_route(route_id)
        route = self._routes[route_id]
        change = PriceChange(
            route_id, "clear", route.input_price, route.output_price, by, time.time()
        )
        if self._redis_url is not None:
            await self._redis_write("hdel", (self._key, route_id), change)
        self._version += 1
        had = route_id in self._overrides
        self._overrides = {k: v for k, v in self._overrides.items() if k != route_id}
        self._history.appendleft(change)
        return had

    async def history(self, limit: int = 50) -> dict[str, Any]:
        """The latest price changes, newest first: {"changes": [...], "shared": bool} (every
        replica's through Redis; this process's when Redis is unreachable or not configured)."""
        limit = max(1, min(limit, HISTORY_SIZE))
        if self._redis_url is not None:
            try:
                raw = await self._client().lrange(self._history_key, 0, limit - 1)
                changes = [c for c in (PriceChange.parse(item) for item in raw) if c is not None]
                return {"changes": [c.as_dict() for c in changes], "shared": True}
            except Exception as exc:
                log.warning("price store: history read failed: %s", type(exc).__name__)
        local = list(self._history)[:limit]
        return {"changes": [c.as_dict() for c in local], "shared": False}

    async def _redis_write(self, method: str, args: tuple[Any, ...], change: PriceChange) -> None:
        """The override and its history entry in one round trip (MULTI: both or neither)."""
        try:
            pipe = self._client().pipeline(transaction=True)
            getattr(pipe, method)(*args)
            pipe.lpush(self._history_key, change.to_json())
            pipe.ltrim(self._history_key, 0, HISTORY_SIZE - 1)
            await pipe.execute()
        except Exception as exc:  # any Redis failure: the override was not stored anywhere
            log.warning("price store: %s failed: %s", method, type(exc).__name__)
            raise PriceStoreUnavailable(
                "the shared price store (Redis) is unavailable; the override was not applied"
            ) from None

    # -- background refresh -------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._redis is None:
            assert self._redis_url is not None
            self._redis = redis_client(self._redis_url)
        return self._redis

    def _parse(self, raw: dict[Any, Any]) -> dict[str, PriceOverride]:
        parsed: dict[str, PriceOverride] = {}
        for key, value in raw.items():
            route_id = key.decode() if isinstance(key, bytes) else str(key)
            if route_id not in self._routes:
                continue  # a route this catalog no longer has
            try:
                data = json.loads(value)
                parsed[route_id] = PriceOverride(
                    route_id=route_id,
                    input=_check_price("input", data["input"]),
                    output=_check_price("output", data["output"]),
                    set_at=float(data.get("set_at", 0.0)),
                )
            except (ValueError, KeyError, TypeError, InvalidRequest):
                log.warning("price store: ignoring a malformed override for %s", route_id)
        return parsed

    async def refresh(self) -> None:
        """Reload every override from Redis now (no-op without Redis)."""
        if self._redis_url is None:
            return
        version = self._version
        try:
            raw = await self._client().hgetall(self._key)
        except Exception as exc:
            if not self._refresh_failing:
                log.warning(
                    "price store: refresh failed (%s); keeping the last prices", type(exc).__name__
                )
            self._refresh_failing = True
            return
        self._refresh_failing = False
        if version == self._version:
            self._overrides = self._parse(raw)

    async def start(self) -> None:
        if self._redis_url is None or self._task is not None:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="price-refresh")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            await self.refresh()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
