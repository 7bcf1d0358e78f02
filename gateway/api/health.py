"""Probes and metrics: `/livez`, `/readyz`, `/metrics`.

/livez    the process answers: no dependency is consulted (a restart would not help them)
/readyz   200 when Redis answers a ping (when REDIS_URL is set) and at least one provider
          is ready; 503 otherwise, with each check's result in the body (the local backend's
          load state and reason under checks["local"])
/metrics  Prometheus text from the app's own registry (gateway/stats/metrics.py)
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.api.state import get_state
from gateway.stats.metrics import render_metrics

router = APIRouter()
PING_TIMEOUT_S = 1.0


@router.get("/livez", response_model=None)
async def livez() -> Response:
    return JSONResponse({"status": "ok"})


async def _ready(provider: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(provider.ready(), PING_TIMEOUT_S))
    except Exception:
        return False


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> Response:
    state = get_state(request)
    checks: dict[str, Any] = {}
    redis_ok = True
    if state.settings.redis_url:
        try:
            redis_ok = bool(await asyncio.wait_for(state.stats.ping(), PING_TIMEOUT_S))
        except Exception:
            redis_ok = False
        checks["redis"] = "ok" if redis_ok else "unreachable"
    else:
        checks["redis"] = "not configured (in-memory stats)"
    names = list(state.providers)
    results = await asyncio.gather(*(_ready(state.providers[n]) for n in names))
    checks["providers"] = dict(zip(names, results, strict=True))
    for name in names:  # a provider with a state of its own (the local backend) reports it
        status = getattr(state.providers[name], "status", None)
        if status is not None:
            checks[name] = status()
    ready = redis_ok and any(results)
    if not any(results):
        checks["reason"] = "no provider is ready" if names else "no provider is configured"
    status = "ready" if ready else "not ready"
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    body, content_type = render_metrics(request.app.state.metrics)
    return Response(body, media_type=content_type)
