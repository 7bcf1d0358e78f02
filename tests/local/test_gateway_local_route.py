"""End to end: the gateway serving from our own backend, in-process, through the openai SDK.

The tiny random-weight checkpoint (tests/local/conftest.py) stands in for WizardLM-2: same
architecture, the real v1 tokenizer. Its answers are compared with the backend's own answer to
the same request, so the test proves the gateway relays the local route faithfully, not just
that something came back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import HOSTED_PROVIDERS
from local_backend.loader import load_service
from tests.fakes.server import ServerThread
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import Gateway, gateway_settings

MODEL = "microsoft/wizardlm-2-8x22b"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
LOCAL = {
    "local_device": "cpu",
    "local_dtype": "float32",
    "local_max_seq_len": 256,
    "local_max_slots": 4,
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeUpstreams]:
    upstreams = FakeUpstreams(list(HOSTED_PROVIDERS)).start()
    yield upstreams
    upstreams.stop()


@pytest.fixture
def start(fakes: FakeUpstreams, tiny_hf_model_dir: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start_gateway(**overrides: Any) -> Gateway:
        fakes.reset()
        options = {**LOCAL, **overrides}
        settings = gateway_settings(fakes, local_model_dir=tiny_hf_model_dir, **options)
        gateway = Gateway(settings)
        gateway.server.start()
        started.append(gateway)
        local = gateway.state.providers["local"]
        assert local.loaded.wait(60), "the local backend did not load"  # type: ignore[attr-defined]
        assert local.load_error is None, local.load_error  # type: ignore[attr-defined]
        return gateway

    yield start_gateway
    servers: list[ServerThread] = []
    for gateway in started:
        gateway.server.stop(wait=False)
        servers.append(gateway.server)
    for server in servers:
        server.join()


@pytest.fixture(scope="module")
def reference(tiny_hf_model_dir: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The backend's own answer to a body, without the gateway in between."""
    service = load_service(
        tiny_hf_model_dir, device="cpu", model_name="wizardlm-2-8x22b", max_seq_len=256
    )

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(service.chat(dict(body, model="wizardlm-2-8x22b")))

    yield answer  # type: ignore[misc]
    service.engine.stop()


NO_HOSTED_KEYS = {f"{name}_api_key": None for name in HOSTED_PROVIDERS}


def test_local_route_answers_sdk_chat(start: Callable[..., Gateway], reference: Any) -> None:
    gateway = start(**NO_HOSTED_KEYS)
    client = gateway.openai()
    expected = reference({"messages": MESSAGES, "max_tokens": 12, "temperature": 0})

    reply = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    completion = reply.parse()
    assert reply.headers["x-gateway-provider"] == "local"
    assert completion.model_extra is not None and completion.model_extra["provider"] == "local"
    assert completion.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    route = next(r for r in gateway.state.catalog.routes() if r.kind == "local")
    cost = route.cost(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert completion.usage.model_extra is not None
    assert completion.usage.model_extra["cost"] == pytest.approx(cost)


def test_local_route_streams(start: Callable[..., Gateway], reference: Any) -> None:
    gateway = start(**NO_HOSTED_KEYS)
    expected = reference({"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    stream = gateway.openai().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, providers = "", None, set()
    for chunk in stream:
        providers.add((chunk.model_extra or {}).get("provider"))
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == expected["choices"][0]["message"]["content"]
    assert providers == {"local"}
    assert usage is not None and usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_falls_back_to_local_when_every_hosted_route_fails(
    start: Callable[..., Gateway], fakes: FakeUpstreams, reference: Any
) -> None:
    gateway = start()
    for name in HOSTED_PROVIDERS:
        fakes[name].inject(Fault("http_500"), times=50)
    expected = reference({"messages": MESSAGES, "max_tokens": 8, "temperature": 0})

    reply = gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert reply.headers["x-gateway-provider"] == "local"
    assert int(reply.headers["x-gateway-attempts"]) > len(HOSTED_PROVIDERS)
    assert reply.parse().choices[0].message.content == expected["choices"][0]["message"]["content"]
    hosted_tried = [name for name in HOSTED_PROVIDERS if fakes[name].requests]
    assert sorted(hosted_tried) == sorted(HOSTED_PROVIDERS)
    usage = gateway.usage(by="route")
    assert set(usage) == {"local/wizardlm-2-8x22b"}  # failed attempts count no usage


def test_local_route_is_skipped_beyond_its_kv_cache(start: Callable[..., Gateway]) -> None:
    gateway = start(**NO_HOSTED_KEYS)
    long_chat = [{"role": "user", "content": "word " * 400}]  # > 256 tokens
    with gateway.http() as http:
        reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def test_local_route_is_skipped_while_its_queue_is_full(start: Callable[..., Gateway]) -> None:
    from local_backend.generation import GenerationRequest

    gateway = start(**NO_HOSTED_KEYS, local_max_slots=1, local_queue_size=1)
    local = gateway.state.providers["local"]
    engine = local._service.engine  # type: ignore[attr-defined]
    prompt = [1, 415, 2936, 9060, 285, 1142]
    long_run = GenerationRequest(prompt_tokens=prompt, max_tokens=200, ignore_eos=True)

    async def fill() -> list[Any]:
        running = engine.submit(long_run)  # takes the only slot
        await anext(aiter(running))  # it is running, not waiting
        waiting = engine.submit(GenerationRequest(prompt_tokens=prompt, max_tokens=4))
        return [running, waiting]

    streams = gateway.call(fill())
    try:
        assert not local.has_capacity()
        with gateway.http() as http:
            reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert reply.status_code == 503
        skipped = reply.json()["error"]["skipped"]["local/wizardlm-2-8x22b"]
        assert skipped == "at capacity (local backend queue full)"
    finally:

        async def release() -> None:
            for stream in streams:
                await stream.aclose()

        gateway.call(release())
    deadline = time.monotonic() + 10
    while not local.has_capacity() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert local.has_capacity()
    reply = gateway.openai().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert reply.model_extra is not None and reply.model_extra["provider"] == "local"
