"""Run-time price overrides on top of the catalog: `PriceBook`.

    book = PriceBook(catalog, redis_url=settings.redis_url, prefix=settings.stats_prefix)
    await book.start()                      # first load + background refresh (Redis only)
    book.effective(route) -> (input, output)   # USD per 1M tokens; a dict lookup, never I/O
    await book.set(route_id, 0.40, 0.45)    # the admin page; visible here before it returns
    await book.clear(route_id)

Without Redis the overrides live in this process only. With Redis they live in one hash,
`<prefix>prices` (field = route id, value = JSON {"input", "output", "set_at"}), so every gateway
replica sees them: a replica's own changes are visible locally at once, the others' after the
next background refresh (`refresh_interval_s`). The request path only ever reads the local dict.
A write goes to Redis first and is applied locally only when Redis took it, so a replica never
serves a price the others will not see; a failed write raises `PriceStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.catalog import Catalog, Route
from gateway.errors import GatewayError, InvalidRequest

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

MAX_PRICE_PER_M = 1_000.0  # USD per 1M tokens; anything above is a typo, not a price


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
        self.generation = 0  # bumped whenever the overrides change (the router's cache key)
        self._current: dict[str, PriceOverride] = {}
        self._overrides = {}
        self._redis_url = redis_url
        self._key = f"{prefix}prices"
        self._refresh_interval_s = refresh_interval_s
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        # Bumped by every local write: a refresh that started before a write must not
        # overwrite it with the older Redis snapshot it read.
        self._version = 0
        self._refresh_failing = False

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
            self.generation += 1  # the router's cached route facts hold prices: now stale
        self._current = value

    def effective(self, route: Route) -> tuple[float, float]:
        override = self._overrides.get(route.id)
        if override is None:
            return route.input_price, route.output_price
        return override.input, override.output

    def overrides(self) -> dict[str, PriceOverride]:
        return dict(self._overrides)

    # -- writes (the admin page) --------------------------------------------------------------

    def _check_route(self, route_id: object) -> str:
        if not isinstance(route_id, str) or route_id not in self._routes:
            raise InvalidRequest(f"unknown route {route_id!r}", param="route_id")
        return route_id

    async def set(self, route_id: object, input: object, output: object) -> PriceOverride:
        route_id = self._check_route(route_id)
        override = PriceOverride(
            route_id=route_id,
            input=_check_price("input", input),
            output=_check_price("output", output),
            set_at=time.time(),
        )
        if self._redis_url is not None:
            await self._redis_call("hset", self._key, route_id, override.to_json())
        self._version += 1
        self._overrides = {**self._overrides, route_id: override}
        return override

    async def clear(self, route_id: object) -> bool:
        """Back to the catalog price; False when the route had no override."""
        route_id = self._check_route(route_id)
        if self._redis_url is not None:
            await self._redis_call("hdel", self._key, route_id)
        self._version += 1
        had = route_id in self._overrides
        self._overrides = {k: v for k, v in self._overrides.items() if k != route_id}
        return had

    async def _redis_call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._client(), method)(*args)
        except Exception as exc:  # any Redis failure: the override was not stored anywhere
            log.warning("price store: %s failed: %s", method, type(exc).__name__)
            raise PriceStoreUnavailable(
                "the shared price store (Redis) is unavailable; the override was not applied"
            ) from None

    # -- background refresh -------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._redis is None:
            from redis.asyncio import Redis

            assert self._redis_url is not None
            self._redis = Redis.from_url(
                self._redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
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
