"""/readyz and /metrics while Redis goes away (issue 8, defect 5): degraded, never unready.

A readiness probe that failed on every replica while Redis was down would take them all out of
the balancer at once, turning a stats outage into a full outage, although serving goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.stats.helpers import REDIS_SERVER, RedisServer

from .conftest import MODEL, Gateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def degraded_gauge(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('moegw_degraded{reason="redis"}'):
            return float(line.split()[-1])
    raise AssertionError("no moegw_degraded{reason=redis} in /metrics")


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_redis_down_is_degraded_not_unready(
    start_gateway: Callable[..., Gateway], redis_server: RedisServer
) -> None:
    gateway = start_gateway(redis_url=redis_server.url, stats_flush_interval_s=0.1)
    with gateway.http() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready" and "degraded" not in ready.json()
        assert eventually(lambda: degraded_gauge(client) == 0.0)

        redis_server.kill()
        degraded = client.get("/readyz")
        assert degraded.status_code == 200
        body = degraded.json()
        assert body["status"] == "degraded"
        assert body["checks"]["redis"] == "unreachable"
        assert any("redis" in reason for reason in body["degraded"])
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving
        assert eventually(lambda: degraded_gauge(client) == 1.0)
        assert client.get("/livez").status_code == 200


def test_unreachable_redis_from_the_start_is_degraded(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(redis_url="redis://127.0.0.1:1/0", stats_flush_interval_s=0.1)
    with gateway.http() as client:
        ready = client.get("/readyz")
        served = client.post("/v1/chat/completions", json=CHAT)
        assert eventually(lambda: degraded_gauge(client) == 1.0)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert served.status_code == 200


def test_memory_stats_are_never_degraded(gateway: Gateway) -> None:
    with gateway.http() as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["checks"]["redis"] == "not configured (in-memory stats)"
        assert degraded_gauge(client) == 0.0
