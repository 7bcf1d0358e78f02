"""A client that goes away stops costing the backend: real server on loopback, real sockets.

Each forward pass is slowed to STEP_S so "within one step" is measurable: after the socket
closes, the request must leave the queue (queued) or free its slot (running) before the
engine starts more than one further step. Without disconnect watching a queued stream keeps
its place until admitted and a non-stream request runs all its tokens.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from local_backend.loader import load_service
from local_backend.openai_api import OpenAIService
from local_backend.server import create_app

from .conftest import wait_for

MODEL = "wizardlm-2-8x22b"
STEP_S = 0.25  # seconds added to every forward pass: far above the loop's reaction time


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[OpenAIService]:
    service = load_service(
        tiny_checkpoint, device="cpu", max_slots=1, max_seq_len=512, queue_size=4, progress=False
    )
    service.engine.model.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))
    yield service
    service.engine.stop()


def send_request(url: str, body: dict[str, Any]) -> socket.socket:
    """POST /v1/completions on a raw socket; the caller reads or closes it."""
    where = urlsplit(url)
    sock = socket.create_connection((where.hostname, where.port))
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def long_body(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "prompt": [1, 415, 5565], "max_tokens": 400, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def cancelled(service: OpenAIService, where: str) -> int:
    return int(service.engine.telemetry.snapshot()["cancelled"][where])


def announcing(spec_version: str, app: Any) -> Any:
    """The app behind a server that announces this ASGI spec version (uvicorn says 2.3;
    from 2.4 on Starlette's StreamingResponse stops watching for http.disconnect)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": spec_version}}
        await app(scope, receive, send)

    return wrapped


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_queued_stream_that_hangs_up_leaves_the_queue_within_one_step(
    service: OpenAIService, run_server: Any, caplog: pytest.LogCaptureFixture, spec_version: str
) -> None:
    engine = service.engine
    app = create_app(service, stop_engine_on_shutdown=False)
    server = run_server(announcing(spec_version, app))
    running = send_request(server.url, long_body(stream=True))
    wait_for(lambda: engine.capacity().active_slots == 1)
    queued = send_request(server.url, long_body(stream=True))
    wait_for(lambda: engine.capacity().queue_depth == 1)
    before = cancelled(service, "queued")
    with caplog.at_level(logging.INFO, logger="local_backend.engine"):
        steps = engine.stats().steps
        queued.close()
        wait_for(lambda: engine.capacity().queue_depth == 0, timeout=5)
        assert engine.stats().steps - steps <= 1
        assert engine.capacity().active_slots == 1  # the running one kept its slot
        assert cancelled(service, "queued") == before + 1
        assert any("cancelled while queued" in r.getMessage() for r in caplog.records)
    metrics = httpx.get(server.url + "/metrics").text
    assert f'local_backend_cancelled_requests_total{{where="queued"}} {before + 1}.0' in metrics
    running.close()
    wait_for(lambda: engine.capacity().active_slots == 0, timeout=5)


def test_a_non_stream_client_that_leaves_frees_its_slot_within_one_step(
    service: OpenAIService, run_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = service.engine
    server = run_server(create_app(service, stop_engine_on_shutdown=False))
    before = cancelled(service, "running")
    client = send_request(server.url, long_body(stream=False))
    wait_for(lambda: engine.capacity().active_slots == 1)
    started = engine.stats().completion_tokens
    wait_for(lambda: engine.stats().completion_tokens >= started + 2)  # it is decoding
    with caplog.at_level(logging.INFO, logger="local_backend.engine"):
        steps = engine.stats().steps
        client.close()
        wait_for(lambda: engine.capacity().active_slots == 0, timeout=5)
        assert engine.stats().steps - steps <= 1
        assert cancelled(service, "running") == before + 1
        assert any("cancelled while running" in r.getMessage() for r in caplog.records)
    assert engine.stats().completion_tokens < started + 50  # far from its 400 tokens


async def test_closing_a_stream_never_read_leaves_the_queue(service: OpenAIService) -> None:
    """A client gone before its first chunk was asked for: closing the chunk stream cancels."""
    from local_backend.engine import Engine

    model, tokenizer, config = service.engine.model, service.engine.tokenizer, service.engine.config
    engine = Engine(model, tokenizer, config, max_slots=1, max_seq_len=64)  # never started
    queued = OpenAIService(engine, model_name=MODEL)
    chunks = await queued.completion_stream({"model": MODEL, "prompt": [1, 415], "stream": True})
    assert engine.capacity().queue_depth == 1
    await chunks.aclose()  # type: ignore[attr-defined]
    assert engine.capacity().queue_depth == 0
    assert engine.telemetry.snapshot()["cancelled"]["queued"] == 1
