"""`gateway routes` and `gateway cheapest`: the catalog as this deployment's server sees it.

Both read the server's settings (GATEWAY_CONFIG, provider keys, REDIS_URL) and rank with the
server's own Router (`rank` for costs and fit, `traffic_shares` for how `plan` would split
traffic by 1/cost²), so what they print is what the server would do.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich import box
from rich.table import Table
from rich.text import Text

from gateway.catalog import Catalog, CatalogError, load_catalog
from gateway.cli.output import CliError, count, emit, emit_json, note, percent, price, render
from gateway.errors import GatewayError
from gateway.prices import PriceBook
from gateway.routing import NotConfigured, RankedRoute, Router
from gateway.settings import Settings
from gateway.stats.base import RouteHealth, StatsStore

UPTIME_WINDOWS = ("5m", "30m", "1d")


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    if config is not None:
        overrides["gateway_config"] = config
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]  # no input values: they may be secrets
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise CliError(f"bad setting {where.upper()}: {first['msg']}") from None
    except SettingsError as exc:  # a value the environment source could not even parse
        raise CliError(f"bad setting: {exc}") from None


def load(config: Path | None) -> tuple[Settings, Catalog]:
    settings = load_settings(config)
    try:
        return settings, load_catalog(settings.gateway_config)
    except CatalogError as exc:
        raise CliError(str(exc)) from None


def configured_providers(settings: Settings, catalog: Catalog) -> set[str]:
    """Hosted: its key is set. Local: a model dir or a base URL is set."""
    names = set()
    for name, spec in catalog.providers.items():
        if spec.kind == "local":
            if settings.local_model_dir is not None or settings.local_base_url is not None:
                names.add(name)
        elif settings.provider_key(name):
            names.add(name)
    return names


async def _shared_state(settings: Settings, catalog: Catalog) -> tuple[PriceBook, StatsStore]:
    """Prices and health as the server sees them: one read from Redis when it is configured."""
    from gateway.stats import make_stats

    prices = PriceBook(catalog, redis_url=settings.redis_url, prefix=settings.stats_prefix)
    stats = make_stats(settings.redis_url, prefix=settings.stats_prefix)
    if settings.redis_url:
        for route in catalog.routes():
            stats.route_health(route.id)  # tell the store which routes to read
        try:
            async with asyncio.timeout(5.0):
                reachable = await stats.ping()
                if reachable:
                    await prices.refresh()
                    await stats.refresh()
        except TimeoutError:
            reachable = False
        if not reachable:
            print(
                "gateway: warning: Redis (REDIS_URL) unreachable: catalog prices, no uptime",
                file=sys.stderr,
            )
        await prices.aclose()
        await stats.aclose()
    return prices, stats


def make_router(settings: Settings, catalog: Catalog) -> Router:
    prices, stats = asyncio.run(_shared_state(settings, catalog))
    return Router(catalog, prices, stats, configured_providers(settings, catalog))


def route_status(e: RankedRoute) -> tuple[str, str]:
    """What a route is doing (a short label) and its colour: live (green), failing (yellow),
    circuit open (red), not part of this deployment (dim). A failing route is never "live"."""
    if e.unavailable is not None:
        if e.route.kind == "local":  # the CLI sees the local route configured or not
            return "no backend", "dim"
        if isinstance(e.unavailable, NotConfigured):
            return "no key", "dim"
        return str(e.unavailable), "yellow"
    if e.health.circuit_open:
        return f"circuit open ({e.health.consecutive_failures})", "bold red"
    if e.health.consecutive_failures:
        return f"failing ({e.health.consecutive_failures})", "yellow"
    return "live", "green"


def _legend(evals: list[RankedRoute]) -> list[str]:
    """What the short statuses mean, for the routes shown."""
    lines = []
    missing = sorted(
        {f"{e.route.provider.upper()}_API_KEY" for e in evals if route_status(e)[0] == "no key"}
    )
    if missing:
        lines.append(f"no key: set {', '.join(missing)} to enable those routes")
    if any(route_status(e)[0] == "no backend" for e in evals):
        lines.append("no backend: set LOCAL_MODEL_DIR or LOCAL_BASE_URL for the local route")
    if any(route_status(e)[0].startswith(("failing", "circuit")) for e in evals):
        lines.append("failing (n) / circuit open (n): n consecutive failed attempts")
    return lines


def _uptime(health: RouteHealth, window: str) -> float | None:
    stats = health.windows.get(window)
    return stats.uptime if stats is not None else None


def _uptime_json(health: RouteHealth) -> dict[str, float | None]:
    return {w: _uptime(health, w) for w in UPTIME_WINDOWS}


def _table(title: str | None = None) -> Table:
    return Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)


def _prices(e: RankedRoute) -> str:
    mark = "*" if _overridden(e) else ""
    return f"{price(e.input_price)}/{price(e.output_price)}{mark}"


# -- gateway routes --------------------------------------------------------------------------


def show_routes(config: Path | None, as_json: bool) -> None:
    settings, catalog = load(config)
    router = make_router(settings, catalog)
    evals: dict[str, RankedRoute] = {}
    for model in catalog.models.values():
        evals.update((e.route.id, e) for e in router.rank(model, 0, 1))
    if as_json:
        out = []
        for r in catalog.routes():
            e = evals[r.id]
            out.append(
                {
                    "model": r.model,
                    "route": r.id,
                    "provider": r.provider,
                    "slug": r.slug,
                    "input_price": e.input_price,
                    "output_price": e.output_price,
                    "price_overridden": _overridden(e),
                    "context": r.context,
                    "configured": e.unavailable is None,
                    "status": route_status(e)[0],
                    "consecutive_failures": e.health.consecutive_failures,
                    "circuit": e.health.circuit,
                    "uptime": _uptime_json(e.health),
                }
            )
        emit_json({"routes": out})
        return
    tables = []
    for model in catalog.models.values():
        table = _table(f"{model.id} ({model.display_name})")
        table.add_column("route", no_wrap=True)
        table.add_column("$/1M in/out", justify="right")
        table.add_column("context", justify="right")
        table.add_column("status")
        table.add_column("up 30m", justify="right")
        table.add_column("up 1d", justify="right")
        for r in model.routes:
            e = evals[r.id]
            status, style = route_status(e)
            table.add_row(
                r.id,
                _prices(e),
                count(r.context),
                Text(status, style=style),
                percent(_uptime(e.health, "30m")),
                percent(_uptime(e.health, "1d")),
            )
        tables.append(table)
    emit(render(*tables))
    for line in _legend(list(evals.values())):
        note(line)
    if any(_overridden(e) for e in evals.values()):
        emit("* run-time price override (admin page)")


def _overridden(e: RankedRoute) -> bool:
    return (e.input_price, e.output_price) != (e.route.input_price, e.route.output_price)


# -- gateway cheapest ------------------------------------------------------------------------


def show_cheapest(
    config: Path | None, model_name: str, prompt_tokens: int, max_tokens: int | None, as_json: bool
) -> None:
    settings, catalog = load(config)
    router = make_router(settings, catalog)
    try:
        ranked = router.rank(model_name, prompt_tokens, max_tokens)
        shares = router.traffic_shares(model_name, prompt_tokens, max_tokens)
    except GatewayError as exc:
        known = ", ".join(sorted(catalog.models))
        raise CliError(f"{exc.message} (known models: {known})") from None
    model = router.resolve(model_name)
    best = next((e.route.id for e in ranked if e.fits and e.unavailable is None), None)
    if as_json:
        routes = [
            {
                "rank": i + 1,
                "route": e.route.id,
                "provider": e.route.provider,
                "slug": e.route.slug,
                "input_price": e.input_price,
                "output_price": e.output_price,
                "completion_tokens": e.completion_tokens,
                "cost_usd": e.cost,
                "context": e.route.context,
                "fits": e.fits,
                "fit_error": e.fit_error,
                "available": e.unavailable is None,
                "unavailable": e.unavailable,
                "status": route_status(e)[0],
                "traffic_share": shares.get(e.route.id, 0.0),
                "uptime": _uptime_json(e.health),
            }
            for i, e in enumerate(ranked)
        ]
        emit_json(
            {
                "model": model.id,
                "prompt_tokens": prompt_tokens,
                "max_tokens": max_tokens,
                "best": best,
                "traffic_policy": "first choice weighted 1/cost² among healthy routes",
                "routes": routes,
            }
        )
        return
    budget = "provider default" if max_tokens is None else count(max_tokens)
    table = _table(f"{model.id}: {count(prompt_tokens)} prompt tokens, max_tokens {budget}")
    table.add_column("route", no_wrap=True)
    table.add_column("$/1M in/out", justify="right")
    table.add_column("cost USD", justify="right")
    table.add_column("share", justify="right")
    table.add_column("status")
    table.add_column("up 30m", justify="right")
    for e in ranked:
        status, style = route_status(e) if e.fits else ("too long", "red")
        share = shares.get(e.route.id)
        table.add_row(
            e.route.id,
            _prices(e),
            f"{e.cost:.6f}",
            "—" if share is None else f"{share * 100:.1f}%",
            Text(status, style=style),
            percent(_uptime(e.health, "30m")),
        )
    emit(render(table))
    for e in ranked:
        if e.fit_error:
            note(f"too long: {e.route.id}: {e.fit_error}")
    for line in _legend(ranked):
        note(line)
    note(f"cheapest usable route: {best or 'none (no key configured, or nothing fits)'}")
    if len(shares) > 1:
        note(
            "share: how often the server tries each route first: in proportion to 1/cost² "
            "among live routes, to spread load (OpenRouter's policy), not always the cheapest"
        )
