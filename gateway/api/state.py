"""What every request handler shares: `GatewayState`, built once by `create_app`.

`gateway.api.app.create_app(settings)` builds one `GatewayState` at start-up and puts it on
`app.state.gw`; handlers reach it with `get_state(request)` (or `Depends(get_state)`).

    settings    the one Settings (secrets stay SecretStr; never render them)
    catalog     pricing.yaml, validated (the file's truth; no overrides)
    stats       StatsStore (memory, or Redis when REDIS_URL is set); health reads are local
    prices      PriceBook: catalog prices + run-time overrides (`effective(route)`)
    router      Router built from catalog, prices, stats and `available_from(providers)`
    providers   the configured providers only, by provider name (hosted: key set)
    dispatcher  gateway.dispatch.Dispatcher
    request_log the dashboard's live request log (fed by the stats store's records)

Lifecycle (create_app's lifespan): `await stats.start()`, `await prices.start()` on start-up;
`await prices.aclose()`, provider `aclose()`, `await stats.aclose()` on shutdown.
`build_router(...)` is the one way the server and the CLI make a Router, so both rank alike.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from gateway.catalog import Catalog
from gateway.prices import PriceBook
from gateway.routing import Router, available_from
from gateway.settings import Settings
from gateway.stats.base import StatsStore
from gateway.stats.request_log import RequestLog
from providers.base import Provider


@dataclass
class GatewayState:
    settings: Settings
    catalog: Catalog
    stats: StatsStore
    prices: PriceBook
    router: Router
    providers: dict[str, Provider]  # by provider name, only configured ones
    dispatcher: Any  # gateway.dispatch.Dispatcher
    request_log: RequestLog | None = None  # the dashboard's live log (None: disabled)


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gw
    return state


def make_prices(settings: Settings, catalog: Catalog) -> PriceBook:
    return PriceBook(catalog, redis_url=settings.redis_url, prefix=settings.stats_prefix)


def build_router(
    catalog: Catalog,
    prices: PriceBook,
    stats: StatsStore,
    providers: Mapping[str, Any],
    counter: Any = None,
    rng: random.Random | None = None,
) -> Router:
    """The Router the server uses: availability = configured providers with capacity."""
    return Router(catalog, prices, stats, available_from(providers), counter, rng)
