"""Probes and metrics: `/livez`, `/readyz`, `/metrics`.

/livez    the process answers: no dependency is consulted (a restart would not help them)
/readyz   200 while at least one provider is ready: the gateway can serve. Redis down is
          "degraded", not unready: stats and price overrides wait in memory and serving goes on,
          so a readiness probe must not take every replica out of the balancer together during
          a Redis outage (which would turn it into a full outage). 503 only when no provider is
          ready. The body names each check (the local backend's load state and reason under
          checks["local"]) and, when degraded, why.
/metrics  Prometheus text from the app's own registry (gateway/stats/metrics.py), plus
          `moegw_degraded{reason}` and `moegw_server_events_total{event}` (what the server
          limits refused, gateway/api/http_server.py)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gateway.api.http_server import SERVER_EVENT_NAMES, SERVER_EVENTS
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
    degraded: list[str] = []
    if state.settings.redis_url:
        try:
            redis_ok = bool(await asyncio.wait_for(state.stats.ping(), PING_TIMEOUT_S))
        except Exception:
            redis_ok = False
        checks["redis"] = "ok" if redis_ok else "unreachable"
        if not redis_ok:
            degraded.append("redis unreachable: stats and price overrides are kept in memory")
    else:
        checks["redis"] = "not configured (in-memory stats)"
    names = list(state.providers)
    results = await asyncio.gather(*(_ready(state.providers[n]) for n in names))
    checks["providers"] = dict(zip(names, results, strict=True))
    for name in names:  # a provider with a state of its own (the local backend) reports it
        status = getattr(state.providers[name], "status", None)
        if status is not None:
            checks[name] = status()
    body: dict[str, Any] = {"checks": checks}
    if not any(results):
        body["status"] = "not ready"
        checks["reason"] = "no provider is ready" if names else "no provider is configured"
    else:
        body["status"] = "degraded" if degraded else "ready"
    if degraded:
        body["degraded"] = degraded
    return JSONResponse(body, status_code=503 if body["status"] == "not ready" else 200)


class HealthCollector(Collector):
    """/metrics: degraded dependencies (1 while Redis, when configured, is not answering the
    stats store's flushes) and the server limits' refusals in this process."""

    def __init__(self, redis_configured: bool, stats_connected: Callable[[], bool]):
        self._redis_configured = redis_configured
        self._stats_connected = stats_connected

    def collect(self) -> Iterator[Metric]:
        degraded = GaugeMetricFamily(
            "moegw_degraded", "1 while a dependency is down but serving goes on", labels=["reason"]
        )
        down = self._redis_configured and not self._stats_connected()
        degraded.add_metric(["redis"], 1.0 if down else 0.0)
        yield degraded
        events = CounterMetricFamily(
            "moegw_server_events",
            "Connections and requests the server limits refused or timed out",
            labels=["event"],
        )
        for event in SERVER_EVENT_NAMES:
            events.add_metric([event], SERVER_EVENTS[event])
        yield events


def register_health_metrics(
    registry: CollectorRegistry, redis_configured: bool, stats_connected: Callable[[], bool]
) -> None:
    registry.register(HealthCollector(redis_configured, stats_connected))


@router.get("/metrics", response_model=None)
async def metrics(request: Request) -> Response:
    body, content_type = render_metrics(request.app.state.metrics)
    return Response(body, media_type=content_type)
