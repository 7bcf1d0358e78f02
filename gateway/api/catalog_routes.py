"""The catalog as clients see it: `GET /v1/models`, `/v1/models/{id}`, `/v1/models/{id}/endpoints`.

`/v1/models` is OpenAI's list shape (the `openai` SDK's `client.models.list()`): one entry per
model, its other names in `aliases` (as OpenRouter lists models, not names). Any alias works
wherever a model id does; lookups are case-insensitive. Model ids contain "/" (`{model_id:path}`).

`/v1/models/{id}/endpoints` follows OpenRouter's endpoints API: `data.endpoints[]` with `name`,
`model_name`, `provider_name`, `tag`, `context_length`, `max_completion_tokens`,
`max_prompt_tokens` (the most prompt tokens the router accepts: the context less the
provider's default completion budget, or 1), `pricing` in USD per token as strings,
`quantization` ("unknown": the providers do not publish it), `supported_parameters` (what the
gateway passes through, less the route's `unsupported_params`), `status` as OpenRouter's
integer (below), `uptime_last_5m|30m|1d` in percent, `latency_last_30m` (time to first token,
seconds) and `throughput_last_30m` (completion tokens/s) as percentiles (p75/p90 null: the
windows keep p50 and p99). Plus our fields: the route id and slug, prices per 1M tokens from
the catalog and effective (overrides applied), uptime over 5m/30m/1d, latency and TTFT
p50/p99, tokens/s, circuit state and `state`:

    state            status   meaning
    available           0     serving
    degraded           -1     serving, but its last attempts failed (tried after healthy ones)
    at_capacity        -2     the local backend's queue is full (or it is loading)
    circuit_open       -3     too many recent failures: tried last
    no_key             -5     the provider's API key is not configured
    not_configured    -10     the local backend is not configured

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


STATUS_CODES = {
    "available": 0,
    "degraded": -1,
    "at_capacity": -2,
    "circuit_open": -3,
    "no_key": -5,
    "not_configured": -10,
}
# What a route accepts besides the prompt: OpenAI's parameters and the samplers our upstreams
# take; a route's `unsupported_params` (pricing.yaml) are taken out of it.
PASSED_PARAMETERS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
)


def route_status(state: GatewayState, route: Route, health: RouteHealth) -> str:
    provider = state.providers.get(route.provider)
    if provider is None:
        return "not_configured" if route.kind == "local" else "no_key"
    if not provider.has_capacity():
        return "at_capacity"
    if health.circuit_open:
        return "circuit_open"
    return "degraded" if health.consecutive_failures else "available"


def _percent(stats: WindowStats | None) -> float | None:
    if stats is None or stats.uptime is None:
        return None
    return round(stats.uptime * 100, 2)


def _percentiles(p50: float | None, p99: float | None) -> dict[str, float | None]:
    return {"p50": p50, "p75": None, "p90": None, "p99": p99}


def max_prompt_tokens(state: GatewayState, route: Route) -> int:
    """What the router lets in with no max_tokens: the context less the provider's default
    completion budget (DeepInfra 512), or less one token."""
    spec = state.catalog.providers.get(route.provider)
    reserved = spec.limits.default_max_tokens if spec is not None else None
    return max(route.context - (reserved or 1), 0)


def endpoint_entry(state: GatewayState, route: Route) -> dict[str, Any]:
    health = state.stats.route_health(route.id)
    effective_in, effective_out = state.prices.effective(route)
    windows = health.windows
    state_name = route_status(state, route, health)
    last_30m = windows.get("30m")
    model = state.catalog.models.get(route.model)
    return {
        "name": f"{route.provider} | {route.slug}",
        "model_name": model.display_name if model is not None else route.model,
        "route": route.id,
        "provider_name": route.provider,
        "tag": route.provider,
        "slug": route.slug,
        "model": route.model,
        "context_length": route.context,
        "max_completion_tokens": route.max_output,
        "max_prompt_tokens": max_prompt_tokens(state, route),
        "quantization": "unknown",
        "supported_parameters": [p for p in PASSED_PARAMETERS if p not in route.unsupported_params],
        "pricing": {"prompt": _per_token(effective_in), "completion": _per_token(effective_out)},
        "price_per_1m": {"input": route.input_price, "output": route.output_price},
        "effective_price_per_1m": {
            "input": effective_in,
            "output": effective_out,
            "overridden": (effective_in, effective_out) != (route.input_price, route.output_price),
        },
        "unsupported_parameters": sorted(route.unsupported_params),
        "last_resort": route.last_resort,
        "status": STATUS_CODES[state_name],
        "state": state_name,
        "circuit": health.circuit,
        "consecutive_failures": health.consecutive_failures,
        "uptime_last_5m": _percent(windows.get("5m")),
        "uptime_last_30m": _percent(last_30m),
        "uptime_last_1d": _percent(windows.get("1d")),
        "latency_last_30m": _percentiles(
            last_30m.ttft_p50_s if last_30m else None, last_30m.ttft_p99_s if last_30m else None
        ),
        "throughput_last_30m": _percentiles(last_30m.tokens_per_s if last_30m else None, None),
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
    data = [model_entry(model, created) for model in state.catalog.models.values()]
    return {"object": "list", "data": data}


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
