"""Regressions from review: a key cut in half by truncation, and an in-process stream opening
past its time budget."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from gateway.errors import UpstreamProtocolError, UpstreamTimeout
from providers.base import PhaseTimeouts, ProviderRequest
from providers.local import InProcessLocalProvider
from providers.openai_compat import OpenAICompatProvider
from providers.openai_stream import OpenAIStream

KEY = "Zq8LmN2pR4tV6xY0aB3cD5eF7gH9jK1m"  # DeepInfra-style: no "sk-" prefix to pattern-match


async def test_upstream_error_detail_never_keeps_part_of_a_key() -> None:
    provider = OpenAICompatProvider("deepinfra", "http://127.0.0.1:9/v1", KEY)
    try:
        for pad in range(170, 200):  # the key straddles the 200-character cut somewhere here
            body = json.dumps({"error": {"message": "x" * pad + f" rejected key {KEY} today"}})
            detail = provider._error_detail(body)
            assert KEY[:8] not in detail, pad
            assert len(detail) <= 200
    finally:
        await provider.aclose()


class SlowService:
    model_name = "m"

    async def chat_stream(self, body: dict[str, Any]) -> Any:
        await asyncio.sleep(3)  # e.g. waiting for prefill before the iterator exists

        async def chunks() -> Any:
            yield {"choices": [{"index": 0, "delta": {"content": "x"}}]}

        return chunks()


async def test_opening_a_local_stream_is_bounded_by_the_first_token_timeout() -> None:
    provider = object.__new__(InProcessLocalProvider)
    provider.name = "local"
    provider._service = SlowService()
    provider.load_error = None
    timeouts = PhaseTimeouts(connect=0.5, headers=0.5, first_token=0.3, gap=0.5, total=2.5)
    request = ProviderRequest("local/m", "m", {"messages": [], "stream": True}, "chat", timeouts)
    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout) as caught:
        await provider.chat(request)
    assert caught.value.phase == "first_token"
    assert time.perf_counter() - started < 1.5


@pytest.mark.parametrize(
    "fragment",
    [
        '"repetition_penalty": NaN',
        '"temperature": Infinity',
        '"provider": {"max_price": {"prompt": NaN}}',
    ],
)
def test_nan_and_infinity_literals_are_invalid_json(
    gateway: Any, upstreams: Any, fragment: str
) -> None:
    raw = '{"model": "wizardlm-2-8x22b", "messages": [{"role": "user", "content": "hi"}], '
    raw += fragment + "}"
    with gateway.http() as http:
        reply = http.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert not any(upstreams[name].requests for name in upstreams.providers)


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": [0], "delta": {"content": "x"}}]},
        {"choices": [{"index": 0, "delta": "x"}]},
        {"choices": {"index": 0}},
        {"choices": ["x"]},
    ],
)
def test_a_malformed_stream_chunk_is_the_upstreams_protocol_error(chunk: dict[str, Any]) -> None:
    stream = object.__new__(OpenAIStream)
    stream._route_id = "deepinfra/m"
    stream._check_error = lambda route_id, data: None
    with pytest.raises(UpstreamProtocolError):
        stream._decode_chunk(json.dumps(chunk).encode())


def test_a_well_formed_stream_chunk_passes() -> None:
    stream = object.__new__(OpenAIStream)
    stream._route_id = "deepinfra/m"
    stream._check_error = lambda route_id, data: None
    chunk = {"choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": None}]}
    assert stream._decode_chunk(json.dumps(chunk).encode()) == chunk
