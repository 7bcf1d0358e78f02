"""`create_app(settings)`: the FastAPI app, its state and its lifecycle.

    app = create_app()            # Settings() from the environment; pricing.yaml validated now
    uvicorn.run(app)              # or: uvicorn --factory gateway.api.app:create_app

Nothing is read or parsed at import. create_app validates the catalog (a bad pricing.yaml fails
here, naming the file and field); the lifespan builds what needs the event loop — stats store,
price book, one pooled httpx client per configured provider, the router and the dispatcher —
and on shutdown closes them in reverse (stats last, so the final usage is flushed).

Every error leaves in OpenAI's shape: GatewayError via `render_error`, unknown paths and bad
methods as 404/405, and anything unexpected as a 500 `api_error` whose details go to the log
only (redacted), never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.accounting import Accountant, EstimateCounter, default_counter
from gateway.api import admin, admin_dashboard, catalog_routes, health, openai_routes
from gateway.api.auth import ClientKeys
from gateway.api.gc_tuning import tune_gc
from gateway.api.startup_report import log_route_summary
from gateway.api.state import GatewayState, build_router, make_prices
from gateway.catalog import load_configured_catalog
from gateway.dispatch import Dispatcher
from gateway.errors import GatewayError, render_error
from gateway.local_price import LocalPriceFeed
from gateway.logging_setup import configure_logging
from gateway.provider_setup import build_providers, close_providers
from gateway.quotas import ChargingStats, make_quotas
from gateway.settings import Settings
from gateway.stats import StatsMetrics, make_stats
from gateway.stats.base import StatsStore
from gateway.stats.request_log import RequestLog

log = logging.getLogger("gateway.api")


class CatchAllMiddleware:
    """The last line: an exception nothing else handled becomes a 500 in OpenAI's shape."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except (ClientDisconnect, OSError):
            return  # the client is gone; there is no one to answer
        except Exception as exc:
            log.error(
                "unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc
            )
            if not started:
                response = render_error(GatewayError("internal error"))
                await response(scope, receive, send)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    error = {"message": str(exc.detail), "type": "invalid_request_error", "code": code}
    return JSONResponse({"error": error}, status_code=exc.status_code, headers=exc.headers)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()))
    error = {
        "message": f"{where}: {first.get('msg')}",
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": where,
    }
    return JSONResponse({"error": error}, status_code=400)


def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return render_error(exc)


class GatewayApp(FastAPI):
    """FastAPI, with POST /v1/chat/completions and /v1/completions served ahead of the
    middleware stack: the stack's layers cost about 0.1 ms per request on our 2-core machines,
    a tenth of the gateway's budget, for nothing these two endpoints use (they authenticate,
    limit, validate and render their own errors). Middleware added to the app therefore does
    not apply to them; every other path goes through FastAPI as usual."""

    # The two completion endpoints' view of app.state, as plain attributes: Starlette's State
    # answers through __getattr__, after a failed lookup (an AttributeError) each time.
    gateway_state: GatewayState | None = None
    client_keys: ClientKeys | None = None
    # Set by `gateway serve` for the app it runs (gc_tuning.py): never for apps built in tests.
    tune_gc: bool = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = openai_routes.FAST_PATHS.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await openai_routes.handle(scope, receive, send, endpoint)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, counter: Any = None) -> GatewayApp:
    """`counter`: a token counter for usage fallback and exact routing (tests inject one)."""
    settings = settings if settings is not None else Settings()
    catalog = load_configured_catalog(settings)

    @asynccontextmanager
    async def lifespan(gateway: GatewayApp) -> AsyncIterator[None]:
        app = gateway
        configure_logging(settings.log_level, settings.secrets(), settings.log_format)
        metrics = StatsMetrics()
        stats = make_stats(
            settings.redis_url,
            metrics=metrics,
            prefix=settings.stats_prefix,
            flush_interval_s=settings.stats_flush_interval_s,
            max_pending=settings.stats_max_pending,
        )
        prices = make_prices(settings, catalog)
        request_log = None
        if settings.request_log_size > 0:
            request_log = RequestLog(
                settings.request_log_size,
                redis_url=settings.redis_url,
                prefix=settings.stats_prefix,
            )
            stats.observer = request_log
        providers = build_providers(catalog, settings)
        log_route_summary(catalog, providers)
        feed = LocalPriceFeed(catalog, providers)  # the local route's price, measured
        prices.measured, prices.measured_version = feed.price, feed.version
        tokens = counter if counter is not None else default_counter()
        exact = None if isinstance(tokens, EstimateCounter) else tokens
        router = build_router(catalog, prices, stats, providers, counter=exact)
        quotas = make_quotas(settings)
        usage_sink = stats if quotas is None else cast(StatsStore, ChargingStats(stats, quotas))
        accountant = Accountant(prices, usage_sink, tokens, settings.usage_count_max_chars)
        dispatcher = Dispatcher(settings, catalog, stats, accountant, providers, metrics=metrics)
        health.register_health_metrics(
            metrics.registry, bool(settings.redis_url), lambda: stats.connected
        )
        app.state.quotas = quotas
        app.state.metrics = metrics
        app.state.gw = gateway.gateway_state = GatewayState(
            settings=settings,
            catalog=catalog,
            stats=stats,
            prices=prices,
            router=router,
            providers=providers,
            dispatcher=dispatcher,
            request_log=request_log,
        )
        await stats.start()
        try:
            await prices.start()
            if request_log is not None:
                await request_log.start()
            if gateway.tune_gc:
                tune_gc(settings.gc_gen0_threshold)
            try:
                yield
            finally:
                await prices.aclose()
                await close_providers(providers)
                if quotas is not None:
                    await quotas.aclose()
        finally:
            await stats.aclose()
            if request_log is not None:
                await request_log.aclose()

    app = GatewayApp(
        title="moe-gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.quotas = None  # per-client limits, built by the lifespan when configured
    app.state.client_keys = app.client_keys = ClientKeys(settings.gateway_api_keys)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(CatchAllMiddleware)
    app.include_router(openai_routes.router)
    app.include_router(catalog_routes.router)
    app.include_router(admin.router)
    app.include_router(admin_dashboard.router)
    app.include_router(health.router)
    return app
