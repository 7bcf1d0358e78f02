"""Fixtures for the stats tests: a fake clock, real Redis (the shared server's DB 13 under a key
prefix of the test's own), dedicated redis-server processes and a fault-injecting proxy."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.stats import MemoryStats, RedisStats, StatsOptions

from .helpers import REDIS_SERVER, FakeClock, FaultProxy, RedisServer

SHARED_REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _shared_redis() -> redis.Redis:
    client = redis.Redis.from_url(SHARED_REDIS_URL, decode_responses=True, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379 (the stats Redis tests need one)")
    return client


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys (and only those) are deleted afterwards."""
    value = f"test-stats:{uuid.uuid4().hex[:12]}:"
    yield value
    client = _shared_redis()
    keys = list(client.scan_iter(match=f"{value}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def shared_redis(prefix: str) -> Iterator[redis.Redis]:
    client = _shared_redis()
    yield client
    client.close()


StoreFactory = Callable[..., MemoryStats | RedisStats]


@pytest.fixture(params=["memory", "redis"])
async def make_store(
    request: pytest.FixtureRequest, prefix: str, clock: FakeClock
) -> AsyncIterator[StoreFactory]:
    """Builds stores of the parametrized kind; Redis ones share the test's prefix on DB 13."""
    kind = request.param
    if kind == "redis":
        _shared_redis().close()
    made: list[MemoryStats | RedisStats] = []

    def factory(**opts: Any) -> MemoryStats | RedisStats:
        options = StatsOptions(prefix=prefix, **opts)
        store: MemoryStats | RedisStats
        if kind == "redis":
            store = RedisStats(SHARED_REDIS_URL, options, clock=clock)
        else:
            store = MemoryStats(options, clock=clock)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy(redis_server.port)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.close()
