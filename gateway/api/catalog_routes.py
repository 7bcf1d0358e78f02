"""The catalog as clients see it: `GET /v1/models`, `/v1/models/{id}`, `/v1/models/{id}/endpoints`.

`/v1/models` is OpenAI's list shape (the `openai` SDK's `client.models.list()`): one entry per
model, then one per alias flagged with `alias_of` (aliases that differ only in case are listed
once; lookups are case-insensitive anyway). Model ids contain "/" (`{model_id:path}`).

`/v1/models/{id}/endpoints` follows OpenRouter's endpoints API (`data.endpoints[]` with
`provider_name`, `tag`, `context_length`, `pricing` in USD per token as strings, `status`,
`uptime_last_30m` in percent), plus our fields: the route id and slug, prices per 1M tokens
from the catalog and effective (run-time overrides applied), uptime over 5m/30m/1d, latency and
time-to-first-token p50/p99, tokens/s (from the 30m window, else 1d, else 5m) and circuit state.
Status: available | no_key | not_configured | at_capacity | circuit_open.

Like OpenAI's, these endpoints need a client key when GATEWAY_API_KEYS is set (checked with the
app's `ClientKeys`, `app.state.client_keys`, the same as the completion endpoints).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.api.state import GatewayState, get_state
from gateway.catalog import Catalog, Model, Route
from gateway.errors import AuthenticationFailed, ModelNotFound, render_error
from gateway.routing import STATS_WINDOWS
from gateway.stats.base import WINDOW_NAMES, RouteHealth, WindowStats

router = APIRouter()


def catalog_created(catalog: Catalog) -> int:
    """`created` for every model: when the catalog file was last changed (0 when unknown)."""
    with contextlib.suppress(OSError):
        return int(os.stat(catalog.source).st_mtime)
    return 0


def owned_by(model: Model) -> str:
    return model.weights.split("/", 1)[0] if "/" in model.weights else "moe-gateway"


def model_entry(model: Model, created: int) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": owned_by(model),
        "name": model.display_name,
        "context_length": model.context,
        "aliases": list(unique_aliases(model)),
    }


def unique_aliases(model: Model) -> list[str]:
    seen = {model.id.lower()}
    out = []
    for alias in model.aliases:
        if alias.lower() not in seen:
            seen.add(alias.lower())
            out.append(alias)
    return out


def _per_token(price_per_m: float) -> str:
    return f"{price_per_m / 1e6:.10f}".rstrip("0").rstrip(".") or "0"


def _window(stats: WindowStats | None) -> dict[str, Any]:
    stats = stats or WindowStats()
    return {
        "requests": stats.requests,
        "failures": stats.failures,
        "uptime": stats.uptime,
        "latency_p50_s": stats.latency_p50_s,
        "latency_p99_s": stats.latency_p99_s,
        "ttft_p50_s": stats.ttft_p50_s,
        "ttft_p99_s": stats.ttft_p99_s,
        "tokens_per_s": stats.tokens_per_s,
    }


def _recent(health: RouteHealth, name: str) -> float | None:
    for window in STATS_WINDOWS:
        value = getattr(health.windows.get(window), name, None)
        if value is not None:
            return float(value)
    return None


def route_status(state: GatewayState, route: Route, health: RouteHealth) -> str:
    provider = state.providers.get(route.provider)
    if provider is None:
        return "not_configured" if route.kind == "local" else "no_key"
    if not provider.has_capacity():
        return "at_capacity"
    return "circuit_open" if health.circuit_open else "available"


def endpoint_entry(state: GatewayState, route: Route) -> dict[str, Any]:
    health = state.stats.route_health(route.id)
    effective_in, effective_out = state.prices.effective(route)
    uptime_30m = health.windows.get("30m")
    return {
        "name": f"{route.provider} | {route.slug}",
        "route": route.id,
        "provider_name": route.provider,
        "tag": route.provider,
        "slug": route.slug,
        "model": route.model,
        "context_length": route.context,
        "max_completion_tokens": route.max_output,
        "pricing": {"prompt": _per_token(effective_in), "completion": _per_token(effective_out)},
        "price_per_1m": {"input": route.input_price, "output": route.output_price},
        "effective_price_per_1m": {
            "input": effective_in,
            "output": effective_out,
            "overridden": (effective_in, effective_out) != (route.input_price, route.output_price),
        },
        "unsupported_parameters": sorted(route.unsupported_params),
        "last_resort": route.last_resort,
        "status": route_status(state, route, health),
        "circuit": health.circuit,
        "consecutive_failures": health.consecutive_failures,
        "uptime_last_30m": (
            round(uptime_30m.uptime * 100, 2)
            if uptime_30m and uptime_30m.uptime is not None
            else None
        ),
        "uptime": {w: _window(health.windows.get(w))["uptime"] for w in WINDOW_NAMES},
        "windows": {w: _window(health.windows.get(w)) for w in WINDOW_NAMES},
        "latency": {
            "p50_s": _recent(health, "latency_p50_s"),
            "p99_s": _recent(health, "latency_p99_s"),
        },
        "ttft": {"p50_s": _recent(health, "ttft_p50_s"), "p99_s": _recent(health, "ttft_p99_s")},
        "tokens_per_s": _recent(health, "tokens_per_s"),
    }


def _denied(request: Request) -> JSONResponse | None:
    """401 when client keys are configured and the request carries none of them."""
    keys = getattr(request.app.state, "client_keys", None)
    if keys is None:
        return None
    try:
        keys.authenticate(request.headers.get("authorization"))
    except AuthenticationFailed as exc:
        return render_error(exc)
    return None


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> JSONResponse | dict[str, Any]:
    if (denied := _denied(request)) is not None:
        return denied
    state = get_state(request)
    created = catalog_created(state.catalog)
    data: list[dict[str, Any]] = []
    aliases: list[dict[str, Any]] = []
    for model in state.catalog.models.values():
        data.append(model_entry(model, created))
        for alias in unique_aliases(model):
            entry = {"id": alias, "object": "model", "created": created}
            aliases.append({**entry, "owned_by": owned_by(model), "alias_of": model.id})
    return {"object": "list", "data": data + aliases}


@router.get("/v1/models/{model_id:path}/endpoints", response_model=None)
async def model_endpoints(model_id: str, request: Request) -> JSONResponse | dict[str, Any]:
    if (denied := _denied(request)) is not None:
        return denied
    state = get_state(request)
    model = state.catalog.resolve(model_id)
    if model is None:
        return render_error(ModelNotFound(f"model {model_id!r} does not exist", param="model"))
    entry = model_entry(model, catalog_created(state.catalog))
    entry["endpoints"] = [endpoint_entry(state, route) for route in model.routes]
    return {"data": entry}


@router.get("/v1/models/{model_id:path}", response_model=None)
async def retrieve_model(model_id: str, request: Request) -> JSONResponse | dict[str, Any]:
    if (denied := _denied(request)) is not None:
        return denied
    state = get_state(request)
    model = state.catalog.resolve(model_id)
    if model is None:
        return render_error(ModelNotFound(f"model {model_id!r} does not exist", param="model"))
    return model_entry(model, catalog_created(state.catalog))
