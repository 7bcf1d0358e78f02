"""The OpenAI-compatible provider against the fake upstreams: parsing, quirks, errors, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.catalog import load_catalog
from gateway.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from gateway.provider_setup import build_providers
from providers.base import PhaseTimeouts, ProviderRequest, ProviderResponse
from providers.openai_compat import OpenAICompatProvider, parse_retry_after
from providers.sse import SSEDecoder, TextStripper, normalize_usage
from tests.fakes.deepinfra_samples import DEEPINFRA_SAMPLE_BODY
from tests.fakes.server import free_port
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import PROVIDER_KEYS, gateway_settings

FAST = PhaseTimeouts(connect=0.3, headers=0.3, first_token=0.3, gap=0.3, total=3.0)
HELLO = [{"role": "user", "content": "Hello!"}]


def provider_for(fakes: FakeUpstreams, name: str, **kwargs: Any) -> OpenAICompatProvider:
    return OpenAICompatProvider(name, fakes.base_url(name), PROVIDER_KEYS[name], **kwargs)


def request(stream: bool = False, timeouts: PhaseTimeouts = FAST, **body: Any) -> ProviderRequest:
    payload: dict[str, Any] = {"model": "client-name", "messages": HELLO, **body}
    if stream:
        payload["stream"] = True
    return ProviderRequest("test/route", "upstream-slug", payload, "chat", timeouts)


async def collect(stream: Any) -> list[dict[str, Any]]:
    try:
        return [chunk async for chunk in stream]
    finally:
        await stream.aclose()


def contents(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture
async def lepton(upstreams: FakeUpstreams) -> AsyncIterator[OpenAICompatProvider]:
    provider = provider_for(upstreams, "lepton")
    yield provider
    await provider.aclose()


# -- pure parsing ----------------------------------------------------------------------------


def test_sse_decoder_handles_comments_multiline_crlf_and_split_reads() -> None:
    stream = b': keep-alive\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: message\ndata: [DONE]\n\n'
    for cut in range(len(stream) + 1):  # every way of splitting it into two network reads
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.close()
        assert events == [b'{"a":\n1}', b"[DONE]"], cut


def test_sse_decoder_returns_an_unterminated_last_event_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n\ndata: two") == [b"one"]
    assert decoder.close() == [b"two"]


def test_sse_decoder_wraps_error_events() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'event: error\ndata: {"message": "boom"}\n\n') == [
        b'{"error": {"message": "boom"}}'
    ]


def test_text_stripper_removes_leaked_text_split_across_chunks() -> None:
    stripper = TextStripper(("</s>",))
    pieces = ["Hi", " there<", "/", "s>", "!"]
    assert [stripper.push(0, p) for p in pieces] == ["Hi", " there", "", "", "!"]
    # A held-back "<" that never became "</s>" is given back when the choice ends.
    assert stripper.push(1, "a <") == "a "
    assert stripper.flush(1) == "<"


def test_retry_after_seconds_and_http_date() -> None:
    now = time.time()
    assert parse_retry_after("3") == 3.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_upstream_cost_moves_out_of_usage_cost() -> None:
    usage = normalize_usage(dict(DEEPINFRA_SAMPLE_BODY["usage"]))  # type: ignore[arg-type]
    assert "estimated_cost" not in usage and "cost" not in usage
    assert usage["cost_details"] == {"upstream_inference_cost": 0.0000268}


# -- against the fakes -------------------------------------------------------------------------


async def test_non_stream_maps_the_slug_and_sends_the_key(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider
) -> None:
    result = await lepton.chat(request(temperature=0.3, top_k=7))
    assert isinstance(result, ProviderResponse)
    assert result.body["choices"][0]["message"]["content"] == "Hello from lepton!"
    sent = upstreams["lepton"].requests[-1]
    assert sent["path"] == "/lepton/v1/chat/completions"
    assert sent["body"]["model"] == "upstream-slug"
    assert sent["body"]["temperature"] == 0.3 and sent["body"]["top_k"] == 7
    assert sent["headers"]["authorization"] == f"Bearer {PROVIDER_KEYS['lepton']}"


async def test_deepinfra_sample_body_keeps_content_and_moves_estimated_cost(
    upstreams: FakeUpstreams,
) -> None:
    provider = provider_for(upstreams, "deepinfra", strip_text=("</s>",))
    try:
        result = await provider.chat(request())
    finally:
        await provider.aclose()
    assert isinstance(result, ProviderResponse)
    expected = DEEPINFRA_SAMPLE_BODY["choices"][0]["message"]["content"]  # type: ignore[index]
    assert result.body["choices"][0]["message"]["content"] == expected
    assert result.body["usage"]["cost_details"]["upstream_inference_cost"] == 0.0000268


async def test_deepinfra_sample_stream_drops_leaked_eos_and_empty_chunks(
    upstreams: FakeUpstreams,
) -> None:
    provider = provider_for(upstreams, "deepinfra", strip_text=("</s>",))
    try:
        chunks = await collect(await provider.chat(request(stream=True)))
    finally:
        await provider.aclose()
    assert contents(chunks) == "  Hi!"
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert texts == [" ", " Hi", "!", None]  # "" and "</s>" are gone; the finish chunk stays
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_leaked_eos_split_across_chunks_is_stripped(upstreams: FakeUpstreams) -> None:
    upstreams["deepinfra"].tokens = ["Hi", " <", "</", "s>", "!"]  # "<" stays: it is text
    provider = provider_for(upstreams, "deepinfra", strip_text=("</s>",))
    try:
        chunks = await collect(await provider.chat(request(stream=True, messages=[])))
    finally:
        await provider.aclose()
    assert contents(chunks) == "Hi <!"


@pytest.mark.parametrize("name", ["lepton", "novita", "openrouter"])
async def test_each_dialect_streams_the_same_answer(upstreams: FakeUpstreams, name: str) -> None:
    # Lepton: JSON over two data lines; Novita: CRLF; OpenRouter: ": comment" keep-alives.
    provider = provider_for(upstreams, name)
    try:
        chunks = await collect(await provider.chat(request(stream=True)))
    finally:
        await provider.aclose()
    assert contents(chunks) == f"Hello from {name}!"


@pytest.mark.parametrize(
    ("fault", "error", "retryable"),
    [
        (Fault("http_401"), UpstreamAuthError, False),
        (Fault("http_500"), UpstreamHTTPError, True),
        (Fault("http_400"), UpstreamHTTPError, False),
        (Fault("malformed"), UpstreamProtocolError, False),
    ],
)
async def test_statuses_map_onto_the_error_tree(
    upstreams: FakeUpstreams,
    lepton: OpenAICompatProvider,
    fault: Fault,
    error: type[Exception],
    retryable: bool,
) -> None:
    upstreams["lepton"].inject(fault)
    with pytest.raises(error) as caught:
        await lepton.chat(request())
    assert caught.value.retryable is retryable  # type: ignore[attr-defined]
    assert PROVIDER_KEYS["lepton"] not in str(caught.value)  # the 500 body echoes our key
    assert "sk-test" not in caught.value.message  # type: ignore[attr-defined]


async def test_400_is_the_requests_fault(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider
) -> None:
    upstreams["lepton"].inject(Fault("http_400"))
    with pytest.raises(UpstreamHTTPError) as caught:
        await lepton.chat(request())
    assert caught.value.fatal_for_request and "bad parameter" in caught.value.message


@pytest.mark.parametrize("value", ["2", "http-date"])
async def test_429_carries_retry_after(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider, value: str
) -> None:
    header = email.utils.formatdate(time.time() + 2, usegmt=True) if value == "http-date" else value
    upstreams["lepton"].inject(Fault("http_429", retry_after=header))
    with pytest.raises(UpstreamHTTPError) as caught:
        await lepton.chat(request())
    assert caught.value.upstream_status == 429 and caught.value.retryable
    assert caught.value.retry_after == pytest.approx(2, abs=1)


async def test_refused_connection(upstreams: FakeUpstreams) -> None:
    provider = OpenAICompatProvider("lepton", f"http://127.0.0.1:{free_port()}/v1", "sk-x")
    try:
        with pytest.raises(UpstreamConnectError):
            await provider.chat(request())
    finally:
        await provider.aclose()


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A listener whose accept queue is full: new connections hang in the handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # non-blocking: the handshake hangs
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in (*fillers, listener):
        sock.close()


async def test_connect_phase_timeout(unaccepting_port: int) -> None:
    provider = OpenAICompatProvider("lepton", f"http://127.0.0.1:{unaccepting_port}/v1", "sk-x")
    try:
        with pytest.raises(UpstreamTimeout) as caught:
            await provider.chat(request())
    finally:
        await provider.aclose()
    assert caught.value.phase == "connect"


@pytest.mark.parametrize(
    ("fault", "stream", "phase"),
    [
        ("stall_headers", False, "headers"),
        ("stall_first_token", False, "first_token"),
        ("stall_first_token", True, "first_token"),
        ("stall_after_first", True, "gap"),
    ],
)
async def test_phase_timeouts(
    upstreams: FakeUpstreams,
    lepton: OpenAICompatProvider,
    fault: str,
    stream: bool,
    phase: str,
) -> None:
    upstreams["lepton"].inject(Fault(fault))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        result = await lepton.chat(request(stream=stream))
        await collect(result)
    assert caught.value.phase == phase
    assert time.monotonic() - started < 2.0


async def test_total_timeout_cuts_a_slow_stream(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider
) -> None:
    upstreams["lepton"].chunk_delay_s = 0.2  # each chunk within the gap, all of them not
    timeouts = PhaseTimeouts(connect=1, headers=1, first_token=1, gap=1, total=0.5)
    with pytest.raises(UpstreamTimeout) as caught:
        await collect(await lepton.chat(request(stream=True, timeouts=timeouts)))
    assert caught.value.phase == "total"


@pytest.mark.parametrize("fault", ["cut_before_first", "cut_after_first"])
async def test_a_cut_stream_is_a_connect_error(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider, fault: str
) -> None:
    upstreams["lepton"].inject(Fault(fault))
    with pytest.raises(UpstreamConnectError):
        await collect(await lepton.chat(request(stream=True)))


async def test_a_malformed_event_is_a_protocol_error(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider
) -> None:
    upstreams["lepton"].inject(Fault("malformed_after_first"))
    with pytest.raises(UpstreamProtocolError):
        await collect(await lepton.chat(request(stream=True)))


async def test_closing_a_stream_hangs_up_on_the_upstream(
    upstreams: FakeUpstreams, lepton: OpenAICompatProvider
) -> None:
    upstreams["lepton"].chunk_delay_s = 0.3
    stream = await lepton.chat(request(stream=True))
    await stream.aclose()  # type: ignore[union-attr]
    for _ in range(100):
        if upstreams["lepton"].disconnects:
            break
        await asyncio.sleep(0.02)
    assert upstreams["lepton"].disconnects == 1


def test_registry_builds_only_keyed_providers_with_overrides(upstreams: FakeUpstreams) -> None:
    settings = gateway_settings(upstreams, novita_api_key=None, lepton_api_key=None)
    catalog = load_catalog(settings.gateway_config)
    providers = build_providers(catalog, settings)
    assert sorted(providers) == ["deepinfra", "openrouter"]  # local: not configured either
    openrouter = providers["openrouter"]
    assert isinstance(openrouter, OpenAICompatProvider)
    client = openrouter._client
    assert str(client.base_url).startswith(upstreams.base_url("openrouter"))
    assert client.headers["HTTP-Referer"] == "https://example.test/app"
    assert client.headers["X-Title"] == "gateway tests"
    assert "HTTP-Referer" not in providers["deepinfra"]._client.headers  # type: ignore[attr-defined]


def test_sse_decoder_whole_events_at_once_match_byte_by_byte() -> None:
    """The decoder's fast path (whole events split at once) answers as the per-line rules."""
    rng = random.Random(7)
    parts = [b'data: {"a":1}\n\n', b"data:x\n\n", b": keep\n", b"\n", b"data: [DONE]\n\n"]
    parts += [b'event: error\ndata: {"m":1}\n\n', b"data: a\ndata: b\n\n", b"id: 3\n", b"data\n\n"]
    for _ in range(500):
        stream = b"".join(rng.choice(parts) for _ in range(rng.randint(1, 8)))
        whole, single = SSEDecoder(), SSEDecoder()
        at_once = whole.feed(stream) + whole.close()
        by_byte = [e for i in range(len(stream)) for e in single.feed(stream[i : i + 1])]
        assert at_once == by_byte + single.close(), stream
