"""The gateway's HTTP route to our backend reads the backend's /readyz: its state and reason
become the route's skip reason, an unreachable backend is skipped, and a server whose /readyz
is not ours (another OpenAI-compatible server) is treated like a hosted route."""

from __future__ import annotations

import asyncio
import socket
import threading

from local_backend.server import create_app
from providers.local_http import HttpLocalProvider
from tests.fakes.server import ServerThread
from tests.fakes.upstream import FakeUpstreams


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def probe(url: str) -> tuple[dict[str, object], str | None]:
    provider = HttpLocalProvider("local", url, "key", poll_interval_s=60)
    try:
        await provider.refresh()
        return provider.status(), provider.unavailable_reason()
    finally:
        await provider.aclose()


def test_unreachable_backend_is_skipped_with_the_reason() -> None:
    status, reason = asyncio.run(probe(f"http://127.0.0.1:{closed_port()}/v1"))
    assert status["status"] == "unreachable"
    assert reason is not None and reason.startswith("local backend unreachable: ")


def test_failed_backend_reason_reaches_the_gateway() -> None:
    failed = threading.Event()

    def loader() -> None:
        raise FileNotFoundError("no config.json in /models/missing")

    app = create_app(loader=loader, model_name="m", on_load_failed=lambda _: failed.set())
    backend = ServerThread(app).start()
    try:
        assert failed.wait(10)
        status, reason = asyncio.run(probe(backend.url + "/v1"))
    finally:
        backend.stop()
    assert status["status"] == "failed"
    assert reason == (
        "local backend failed: loading failed (FileNotFoundError: no config.json in "
        "/models/missing)"
    )


def test_a_server_without_our_readyz_is_available() -> None:
    fakes = FakeUpstreams(["local"]).start()
    try:
        status, reason = asyncio.run(probe(fakes.base_url("local")))
    finally:
        fakes.stop()
    assert status["status"] == "unknown" and reason is None
