"""The `gateway` command: serve, routes, cheapest.

    gateway serve [--host H] [--port P] [--workers N] [--config pricing.yaml]
    gateway routes [--config PATH] [--json]
    gateway cheapest --model M --prompt-tokens N [--max-tokens K] [--config PATH] [--json]

`routes` and `cheapest` read the same settings as the server (GATEWAY_CONFIG, the provider
keys, REDIS_URL) and rank with the server's own `Router.rank`, so the answer is the one the
server would route by: effective prices (run-time overrides from Redis included when REDIS_URL
is set), context fit with the provider's default max_tokens, and uptime from the shared stats
(none without Redis: a fresh process has seen no traffic). Errors — unknown model, bad
pricing.yaml (the message names the file and the field), bad settings — print one line to
stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.catalog import Catalog, CatalogError, Route, load_catalog
from gateway.errors import GatewayError
from gateway.prices import PriceBook
from gateway.routing import RankedRoute, Router
from gateway.settings import Settings
from gateway.stats.base import RouteHealth, StatsStore


class CliError(Exception):
    """A one-line message for stderr; exit status 2."""


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    if config is not None:
        overrides["gateway_config"] = config
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]  # no input values: they may be secrets
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise CliError(f"bad setting {where}: {first['msg']}") from None


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


def _router(settings: Settings, catalog: Catalog) -> Router:
    prices, stats = asyncio.run(_shared_state(settings, catalog))
    return Router(catalog, prices, stats, configured_providers(settings, catalog))


def _pct(health: RouteHealth, window: str) -> float | None:
    stats = health.windows.get(window)
    return stats.uptime if stats is not None else None


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _uptime_json(health: RouteHealth) -> dict[str, float | None]:
    return {w: _pct(health, w) for w in ("5m", "30m", "1d")}


# -- commands ------------------------------------------------------------------------------------


def cmd_routes(args: argparse.Namespace) -> int:
    settings, catalog = load(args.config)
    router = _router(settings, catalog)
    # rank() with an empty prompt gives each route's effective price, availability and health
    evals: dict[str, RankedRoute] = {}
    for model in catalog.models.values():
        evals.update((e.route.id, e) for e in router.rank(model, 0, 1))
    routes: list[Route] = catalog.routes()
    if args.json:
        out = [
            {
                "model": r.model,
                "route": r.id,
                "provider": r.provider,
                "slug": r.slug,
                "input_price": evals[r.id].input_price,
                "output_price": evals[r.id].output_price,
                "context": r.context,
                "configured": evals[r.id].unavailable is None,
                "uptime": _uptime_json(evals[r.id].health),
            }
            for r in routes
        ]
        print(json.dumps({"routes": out}, indent=2))
        return 0
    headers = ["model", "route", "provider", "slug", "$/1M in", "$/1M out", "context", "key"]
    headers.append("uptime 30m/1d")
    rows = []
    for r in routes:
        e = evals[r.id]
        overridden = (e.input_price, e.output_price) != (r.input_price, r.output_price)
        mark = "*" if overridden else ""
        key = "yes" if e.unavailable is None else ("not configured" if r.kind == "local" else "no")
        uptime = f"{_fmt_pct(_pct(e.health, '30m'))}/{_fmt_pct(_pct(e.health, '1d'))}"
        prices = [f"{e.input_price:.4g}{mark}", f"{e.output_price:.4g}{mark}"]
        rows.append([r.model, r.id, r.provider, r.slug, *prices, str(r.context), key, uptime])
    print(_table(headers, rows))
    if any("*" in row[4] for row in rows):
        print("* run-time price override (admin page)")
    return 0


def cmd_cheapest(args: argparse.Namespace) -> int:
    settings, catalog = load(args.config)
    router = _router(settings, catalog)
    try:
        ranked = router.rank(args.model, args.prompt_tokens, args.max_tokens)
    except GatewayError as exc:
        known = ", ".join(sorted(catalog.models))
        raise CliError(f"{exc.message} (known models: {known})") from None
    model = router.resolve(args.model)
    best = next((e.route.id for e in ranked if e.fits and e.unavailable is None), None)
    if args.json:
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
                "uptime": _uptime_json(e.health),
            }
            for i, e in enumerate(ranked)
        ]
        out = {
            "model": model.id,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "best": best,
            "routes": routes,
        }
        print(json.dumps(out, indent=2))
        return 0
    headers = ["#", "route", "$/1M in", "$/1M out", "cost USD", "fits", "key", "uptime 30m/1d"]
    rows = [
        [
            str(i + 1),
            e.route.id,
            f"{e.input_price:.4g}",
            f"{e.output_price:.4g}",
            f"{e.cost:.6f}",
            "yes" if e.fits else "no",
            "yes" if e.unavailable is None else "no",
            f"{_fmt_pct(_pct(e.health, '30m'))}/{_fmt_pct(_pct(e.health, '1d'))}",
        ]
        for i, e in enumerate(ranked)
    ]
    max_tokens = "provider default" if args.max_tokens is None else str(args.max_tokens)
    print(f"{model.id}: {args.prompt_tokens} prompt tokens, max_tokens {max_tokens}")
    print(_table(headers, rows))
    for e in ranked:
        if e.fit_error:
            print(f"  {e.route.id}: {e.fit_error}")
    print(f"cheapest usable route: {best or 'none (no key configured, or nothing fits)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    given = {"host": args.host, "port": args.port, "workers": args.workers}
    settings = load_settings(args.config, **{k: v for k, v in given.items() if v is not None})
    try:
        load_catalog(settings.gateway_config)  # fail fast, with the file and field named
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    from gateway.api.serving import serve

    serve(settings, config_path=args.config)
    return 0


# -- argument parsing ----------------------------------------------------------------------------


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, help="pricing.yaml (default: GATEWAY_CONFIG)")

    serve = sub.add_parser("serve", parents=[config], help="run the HTTP gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_count(1))
    serve.add_argument(
        "--workers", type=_count(1), help="processes, one per core to use (default: WORKERS or 1)"
    )
    serve.set_defaults(func=cmd_serve)

    routes = sub.add_parser("routes", parents=[config], help="every route, price and uptime")
    routes.add_argument("--json", action="store_true")
    routes.set_defaults(func=cmd_routes)

    cheapest = sub.add_parser(
        "cheapest", parents=[config], help="routes ranked by cost for a token mix"
    )
    cheapest.add_argument("--model", required=True)
    cheapest.add_argument("--prompt-tokens", type=_count(0), required=True)
    cheapest.add_argument(
        "--max-tokens", type=_count(1), help="completion tokens (default: provider default)"
    )
    cheapest.add_argument("--json", action="store_true")
    cheapest.set_defaults(func=cmd_cheapest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except CliError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
