"""Redis killed (SIGKILL) under load, two gateway replicas on it (issue 8): no client notices,
and once Redis is back (AOF, same port) the shared usage equals exactly what the upstreams
served: nothing lost while it was down, nothing counted twice by the retried batches.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstreams
from tests.stats.helpers import REDIS_SERVER, RedisServer

from .conftest import MODEL, Gateway

CONCURRENCY = 12


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, aof=True)
    server.start()
    yield server
    server.kill()


async def _one(client: httpx.AsyncClient, url: str, index: int) -> bool:
    """One request; True when the client got a whole answer."""
    stream = index % 2 == 0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {index} " + "word " * (index % 7)}],
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            raw = await response.aread()
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    if stream:
        return raw.rstrip().endswith(b"data: [DONE]")
    return bool(json.loads(raw)["choices"])


async def _load(
    replicas: list[Gateway], redis: RedisServer, requests: int
) -> tuple[list[bool], list[bool]]:
    """`requests` requests spread over the replicas; Redis is killed after a third of them and
    started again (same port, same AOF) after two thirds. Also returns whether each replica
    had noticed the outage (its stats store disconnected) before the restart."""
    results: list[bool] = []
    noticed: list[bool] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            results.append(await _one(client, replicas[index % len(replicas)].url, index))
            if len(results) == requests // 3 and redis.process is not None:
                redis.kill()
            elif len(results) == 2 * requests // 3 and redis.process is None:
                for _ in range(100):  # the outage is real: both replicas are buffering
                    if not any(r.state.stats.connected for r in replicas):
                        break
                    await asyncio.sleep(0.02)
                noticed.extend(not r.state.stats.connected for r in replicas)
                await asyncio.to_thread(redis.start)

    async with httpx.AsyncClient(timeout=20) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return results, noticed


@pytest.mark.parametrize(
    "requests", [240, pytest.param(3000, marks=pytest.mark.faults_heavy, id="heavy")]
)
def test_redis_killed_under_load_two_replicas_no_failures_exact_usage(
    start_gateway: Callable[..., Gateway],
    upstreams: FakeUpstreams,
    aof_redis: RedisServer,
    requests: int,
) -> None:
    shared = {
        "redis_url": aof_redis.url,
        "stats_prefix": f"moegw-outage-{uuid.uuid4().hex[:8]}:",
        "stats_flush_interval_s": 0.05,
        # Phase timeouts as loose as production's: with the suite's 0.4 s ones a loaded machine
        # makes the gateway give up on an answer the fake still completes (and counts).
        "timeout_headers_s": 10.0,
        "timeout_first_token_s": 10.0,
        "timeout_gap_s": 10.0,
        "timeout_total_s": 30.0,
    }
    replicas = [start_gateway(**shared), start_gateway(**shared)]
    results, noticed = asyncio.run(_load(replicas, aof_redis, requests))
    assert aof_redis.process is not None, "Redis was not restarted"
    assert noticed == [True, True], "the replicas never saw Redis down"
    assert len(results) == requests
    assert results.count(False) == 0, f"{results.count(False)} client failures"

    for replica in replicas:  # push what was buffered during the outage
        for _ in range(100):
            replica.call(replica.state.stats.flush())
            if replica.state.stats.pending == 0:
                break
        assert replica.state.stats.pending == 0
    totals = replicas[0].usage("model")[MODEL]
    assert totals == replicas[1].usage("model")[MODEL]  # both read the same shared numbers
    served = [fake.served for fake in upstreams.providers.values()]
    assert totals.requests == sum(s.requests for s in served) == requests
    assert totals.prompt_tokens == sum(s.prompt_tokens for s in served)
    assert totals.completion_tokens == sum(s.completion_tokens for s in served)
