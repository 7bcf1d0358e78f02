"""`x-gateway-overhead-ms` is the gateway's own time: upstream waits out, gateway CPU in.

And the client-hang-up watch: a callback from the connection under `gateway serve`'s protocol,
a watcher task under any other ASGI server; both cancel the upstream call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.accounting import EstimateCounter
from gateway.api.http_server import GatewayHttpProtocol
from gateway.api.streaming import ClientGone, DisconnectWatch
from gateway.catalog import Model
from providers.http1_connection import Connection
from providers.upstream_wait import CURRENT, WaitMeter, blocked_on
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway
from tests.gateway.test_streaming import wait_for

HI = [{"role": "user", "content": "Say hello to the tests"}]
ONLY_LEPTON = {"provider": {"only": ["lepton"]}}


class SlowCounter(EstimateCounter):
    """Token counting that holds the event loop for `block_s` (gateway CPU, as the tokenizer)."""

    def __init__(self, block_s: float):
        self.block_s = block_s

    def count_text(self, model: Model, text: str) -> int:
        time.sleep(self.block_s)
        return super().count_text(model, text)


def _post(gateway: Gateway, **body: Any) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": MODEL, "messages": HI, **ONLY_LEPTON, **body},
        timeout=10,
    )
    return response, (time.perf_counter() - started) * 1000


def test_a_slow_upstream_is_not_the_gateways_time(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["lepton"].chunk_delay_s = 0.1  # the fake "generates" for 0.4 s
    response, wall_ms = _post(gateway)
    assert response.status_code == 200
    overhead = float(response.headers["x-gateway-overhead-ms"])
    assert wall_ms >= 400
    assert 0 < overhead < 100  # (typically ~1 ms; generous for a loaded machine)


def test_a_slow_upstream_stream_is_not_the_gateways_time(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["lepton"].chunk_delay_s = 0.1  # 0.1 s before each chunk, the first included
    response, wall_ms = _post(gateway, stream=True)
    assert response.status_code == 200 and wall_ms >= 400
    assert 0 < float(response.headers["x-gateway-overhead-ms"]) < 80


def test_gateway_cpu_counts_in_the_overhead(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    # No usage from the upstream: the gateway counts the answer itself, holding its loop.
    gateway = start_gateway(app_kwargs={"counter": SlowCounter(0.15)})
    upstreams["lepton"].inject(Fault("no_usage"))
    response, _ = _post(gateway)
    assert response.status_code == 200
    assert float(response.headers["x-gateway-overhead-ms"]) >= 150


async def test_a_wait_ends_when_the_bytes_arrive_not_when_the_task_resumes() -> None:
    """Time between the upstream's bytes arriving and the task running again is the event
    loop busy with the gateway's other work: it stays in the gateway's share."""
    meter = WaitMeter()
    CURRENT.set(meter)
    conn = Connection((b"http", "127.0.0.1", 1))
    loop = asyncio.get_running_loop()

    def bytes_arrive_then_the_loop_is_busy() -> None:
        conn._wake()
        time.sleep(0.2)

    started = time.perf_counter()
    loop.call_later(0.05, bytes_arrive_then_the_loop_is_busy)
    await conn.wait(None)
    total = time.perf_counter() - started
    assert 0.045 <= meter.blocked_s <= total - 0.19


async def test_blocked_on_counts_a_whole_await_and_nothing_outside_a_request() -> None:
    meter = WaitMeter()
    CURRENT.set(meter)
    await blocked_on(asyncio.sleep(0.05))
    assert meter.blocked_s >= 0.045
    CURRENT.set(None)
    first = meter.blocked_s
    await blocked_on(asyncio.sleep(0.01))  # no meter: no error, nothing counted
    assert meter.blocked_s < 0.2
    assert meter.blocked_s == first  # not even on the meter that was current before


@pytest.mark.parametrize("server_http", [GatewayHttpProtocol, "httptools"])
def test_hang_up_cancels_the_upstream_call_with_either_server_protocol(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, server_http: Any
) -> None:
    gateway = start_gateway(server_http=server_http)
    lepton = upstreams["lepton"]
    lepton.chunk_delay_s = 0.5  # the fake "generates" for 2 s before answering
    body = {"model": MODEL, "messages": HI, **ONLY_LEPTON}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=0.3)
    wait_for(lambda: lepton.disconnects == 1)
    assert lepton.served.requests == 0
    assert gateway.usage("route") == {}


class FakeConnection:
    def __init__(self, lost: bool = False):
        self.lost = lost
        self.callbacks: list[Callable[[], None]] = []

    def watch_disconnect(self, callback: Callable[[], None]) -> bool:
        if self.lost:
            return False
        self.callbacks.append(callback)
        return True

    def unwatch_disconnect(self, callback: Callable[[], None]) -> None:
        self.callbacks.remove(callback)


async def _never() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def test_the_watch_under_gateway_serve_is_a_callback_not_a_task() -> None:
    conn = FakeConnection()
    tasks_before = len(asyncio.all_tasks())
    watch = DisconnectWatch(_never, {"gateway.connection": conn})
    assert len(asyncio.all_tasks()) == tasks_before and len(conn.callbacks) == 1

    async def hang_up_soon() -> None:
        await asyncio.sleep(0.01)
        conn.callbacks[0]()

    hanging = asyncio.create_task(hang_up_soon())
    with pytest.raises(ClientGone):
        await watch.run(asyncio.sleep(5))
    await hanging
    watch.close()
    assert conn.callbacks == []  # unregistered
    gone = DisconnectWatch(_never, {"gateway.connection": FakeConnection(lost=True)})
    assert gone.gone
