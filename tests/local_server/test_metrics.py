"""/metrics on the backend server: queue, slots, KV cache use, tokens/s, TTFT and inter-token
histograms, cancels; and the rolling decode throughput per batch size that /readyz reports
for the gateway's price (issue 11)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_backend.loader import load_service
from local_backend.openai_api import OpenAIService
from local_backend.server import create_app

MODEL = "wizardlm-2-8x22b"


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[OpenAIService]:
    service = load_service(
        tiny_checkpoint, device="cpu", max_slots=2, max_seq_len=128, progress=False
    )
    yield service
    service.engine.stop()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


async def test_metrics_follow_the_requests_served(service: OpenAIService) -> None:
    app = create_app(service, stop_engine_on_shutdown=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        idle = (await http.get("/metrics")).text
        assert sample(idle, "local_backend_free_slots") == 2
        assert sample(idle, "local_backend_ttft_seconds_count") == 0
        body: dict[str, Any] = {"model": MODEL, "prompt": [1, 415, 5565, 302], "ignore_eos": True}
        for max_tokens in (5, 7):
            answer = await http.post("/v1/completions", json={**body, "max_tokens": max_tokens})
            assert answer.status_code == 200
        text = (await http.get("/metrics")).text
        readyz = (await http.get("/readyz")).json()
    assert sample(text, "local_backend_queue_depth") == 0
    assert sample(text, "local_backend_running_slots") == 0
    assert sample(text, "local_backend_free_slots") == 2
    assert sample(text, "local_backend_kv_cache_used_ratio") == 0
    assert sample(text, "local_backend_ttft_seconds_count") == 2
    # a gap per step after the first; the step that completes a prompt samples its first token
    # and decodes the second, so a request of n tokens has n - 1 steps and n - 2 gaps
    assert sample(text, "local_backend_inter_token_seconds_count") == (5 - 2) + (7 - 2)
    assert sample(text, "local_backend_tokens_total", '{phase="prefill"}') == 8
    assert sample(text, "local_backend_tokens_total", '{phase="decode"}') == (5 - 1) + (7 - 1)
    assert sample(text, "local_backend_decode_tokens_per_second") > 0
    assert sample(text, "local_backend_prefill_tokens_per_second") > 0
    assert sample(text, "local_backend_decode_tokens_per_second_by_batch", '{batch="1"}') > 0
    assert sample(text, "local_backend_cancelled_requests_total", '{where="running"}') == 0
    assert sample(text, "local_backend_load_state", '{state="ready"}') == 1
    by_batch = readyz["throughput"]["decode_by_batch"]
    assert list(by_batch) == ["1"] and by_batch["1"]["steps"] == (5 - 1) + (7 - 1)  # decodes
    assert by_batch["1"]["tokens_per_s"] == pytest.approx(
        sample(text, "local_backend_decode_tokens_per_second_by_batch", '{batch="1"}')
    )


async def test_kv_cache_use_while_a_request_runs(service: OpenAIService) -> None:
    from local_backend.generation import GenerationRequest

    engine = service.engine
    stream = engine.submit(GenerationRequest([1, 415, 5565, 302], 50, ignore_eos=True))
    checked = False
    async with stream:
        async for _ in stream:
            cached, size = engine.kv_cache_use()
            assert size == 2 * 128
            assert 4 <= cached <= 4 + 50
            checked = True
            break
    assert checked  # the stream produced a token: the checks above ran
