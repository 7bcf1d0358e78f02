"""The fault matrix's oversized answers at the issue's sizes, against the default limits:
`make test-faults` (skipped unless `-m faults_heavy`). Each is the cheapest route's answer; the
next route serves, and this process's peak RSS (gateway, fakes and client share it) grows by a
bounded amount, not by the answer's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.hostile import gzip_bomb
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway

pytestmark = pytest.mark.faults_heavy
MiB = 1 << 20
STATUS = Path("/proc/self/status")


def memory_mb(field: str) -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def ask(gateway: Gateway, stream: bool) -> tuple[int, dict[str, str], list[str]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        "stream_options": {"include_usage": True},
        "provider": {"sort": "price"},
    }
    events: list[str] = []
    with (
        gateway.http() as client,
        client.stream("POST", "/v1/chat/completions", json=body, timeout=300) as response,
    ):
        if stream:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        else:
            events = [response.read().decode()]
        return response.status_code, dict(response.headers), events


HEAVY = {
    "json_body_200MB": (Fault("oversized_body", size=200 * MiB), False),
    "gzip_bomb_500MB_json": (Fault("gzip_bomb", size=500 * MiB), False),
    "gzip_bomb_500MB_stream": (Fault("gzip_bomb", size=500 * MiB), True),
    "headers_24MB": (Fault("oversized_headers", size=24 * MiB), False),
    "sse_line_300MB": (Fault("oversized_line", size=300 * MiB), True),
}


@pytest.mark.parametrize("name", list(HEAVY))
def test_an_oversized_answer_fails_over_without_a_memory_spike(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, name: str
) -> None:
    fault, stream = HEAVY[name]
    if fault.kind == "gzip_bomb":
        gzip_bomb(fault.size)  # built (and cached) now: not on the fakes' loop mid-request
    gateway = start_gateway(request_deadline_s=120.0, timeout_first_token_s=60.0)
    ask(gateway, stream)  # warm
    upstreams.reset()
    upstreams["openrouter"].inject(fault)
    before = memory_mb("VmRSS")
    if not reset_peak():
        pytest.skip("this kernel cannot reset the peak RSS")
    status, headers, _ = ask(gateway, stream)
    growth = memory_mb("VmHWM") - before
    assert status == 200
    assert headers["x-gateway-provider"] == "lepton"
    assert upstreams["openrouter"].requests and upstreams["lepton"].requests
    # default limits: 16 MB body, 16 MB decoded, 64 KB head, 1 MB event
    assert growth < 120, f"peak RSS grew {growth:.0f} MB"


def test_a_60MB_stream_without_usage_is_counted_bounded_and_flagged(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(request_deadline_s=120.0)
    upstreams["openrouter"].tokens = ["x" * (100 * 1024)] * 600
    upstreams["openrouter"].inject(Fault("no_usage"))
    before = memory_mb("VmRSS")
    reset_peak()
    status, _, events = ask(gateway, True)
    growth = memory_mb("VmHWM") - before
    assert status == 200 and events[-1] == "[DONE]"
    usage: dict[str, Any] = json.loads(events[-2])["usage"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] >= 60 * MiB // 100  # extrapolated from a sample
    assert growth < 400, f"peak RSS grew {growth:.0f} MB"
