"""The fault matrix: every upstream fault x stream / non-stream x one route / every route failing.

Routes are tried cheapest first (provider.sort=price): openrouter, lepton, novita, deepinfra.
One route failing: openrouter has the fault, lepton serves (before the first token; a fault
after it ends the stream with an error event, never a faked finish). Every route failing: an
OpenAI-shaped 502 (each attempt failed), 429 (each attempt was rate limited: the smallest
Retry-After) or 504 (the request's deadline passed first). Always:
the client's wait is within the request deadline + 10%, and the limits on what an upstream may
send (body, decompressed body, headers, one stream event) make an oversized answer the route's
protocol error (fail over) instead of a memory spike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.hostile import gzip_bomb
from tests.fakes.server import free_port
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, PROVIDER_KEYS, Gateway

DEADLINE_S = 3.0
WITHIN_DEADLINE_S = DEADLINE_S * 1.1
ROUTES = ("openrouter", "lepton", "novita", "deepinfra")  # cheapest first
LIMITS = {
    "request_deadline_s": DEADLINE_S,
    "upstream_max_body_bytes": 256 * 1024,
    "upstream_max_decompressed_bytes": 1024 * 1024,
    "upstream_max_header_bytes": 16 * 1024,
    "upstream_max_sse_line_bytes": 64 * 1024,
}
MiB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def tokenizer_loaded() -> None:
    """The first token count in a process imports and loads the tokenizer (~0.5 s, holding
    the GIL). Gateway, fakes and client share this process: done here, it is not the client's
    wait in whichever case counts first (a real client is another process)."""
    from gateway.accounting import default_counter
    from gateway.catalog import load_catalog
    from gateway.settings import DEFAULT_CONFIG

    model = load_catalog(DEFAULT_CONFIG).models[MODEL]
    default_counter().count_text(model, "warm")


@dataclass(frozen=True)
class Case:
    fault: Fault | None  # None: the connection is refused
    streams_only: bool = False  # the fault exists only in a stream
    mid_stream: bool = False  # after the first token: the stream ends with an error event
    stalls: bool = False  # every route failing runs into the deadline: 504


CASES = {
    "http_500": Case(Fault("http_500")),
    "http_429_retry_after": Case(Fault("http_429", retry_after="0")),
    "http_401": Case(Fault("http_401")),
    "refused": Case(None),
    "stall_before_headers": Case(Fault("stall_headers"), stalls=True),
    "stall_after_headers": Case(Fault("stall_first_token"), stalls=True),
    "cut_before_first_token": Case(Fault("cut_before_first"), streams_only=True),
    "stall_mid_stream": Case(Fault("stall_after_first"), streams_only=True, mid_stream=True),
    "cut_mid_stream": Case(Fault("cut_after_first"), streams_only=True, mid_stream=True),
    "trickle_past_deadline": Case(
        Fault("trickle", interval_s=0.05), streams_only=True, mid_stream=True
    ),
    "malformed": Case(Fault("malformed")),
    "malformed_mid_stream": Case(
        Fault("malformed_after_first"), streams_only=True, mid_stream=True
    ),
    "wrong_content_type": Case(Fault("wrong_content_type")),
    "oversized_body": Case(Fault("oversized_body", size=4 * MiB)),
    "oversized_headers": Case(Fault("oversized_headers", size=256 * 1024)),
    "oversized_sse_line": Case(Fault("oversized_line", size=8 * MiB), streams_only=True),
    "gzip_bomb": Case(Fault("gzip_bomb", size=16 * MiB)),
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any] | None  # non-stream answers and errors
    events: list[str]  # stream: each event's data
    elapsed_s: float

    @property
    def text(self) -> str:
        if self.body is not None and "choices" in self.body:
            return str(self.body["choices"][0]["message"]["content"])
        out = []
        for data in self.events:
            if data.startswith("{"):
                for choice in json.loads(data).get("choices") or ():
                    out.append(choice.get("delta", {}).get("content") or "")
        return "".join(out)


def ask(gateway: Gateway, stream: bool) -> Answer:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        "provider": {"sort": "price"},
    }
    started = time.perf_counter()
    with gateway.http() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = r.read()
        headers = dict(r.headers)
    elapsed = time.perf_counter() - started
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
        return Answer(r.status_code, headers, None, events, elapsed)
    return Answer(r.status_code, headers, json.loads(raw), [], elapsed)


def start(start_gateway: Callable[..., Gateway], case: Case, failing: tuple[str, ...]) -> Gateway:
    overrides: dict[str, Any] = dict(LIMITS)
    if case.fault is None:  # refused: nothing listens where these routes point
        for name in failing:
            overrides[f"{name}_base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    return start_gateway(**overrides)


def assert_error_shape(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.body is not None
    error = answer.body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] and error["code"]
    assert not any(key in json.dumps(answer.body) for key in PROVIDER_KEYS.values())
    return dict(error)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("failing", ["one_route", "all_routes"])
def test_fault_matrix(
    start_gateway: Callable[..., Gateway],
    upstreams: FakeUpstreams,
    name: str,
    stream: bool,
    failing: str,
) -> None:
    case = CASES[name]
    if case.streams_only and not stream:
        pytest.skip("a fault of streams only")
    routes = ROUTES[:1] if failing == "one_route" else ROUTES
    if case.fault is not None and case.fault.kind == "gzip_bomb":
        gzip_bomb(case.fault.size)  # built now (cached), not on the fakes' loop mid-request
    gateway = start(start_gateway, case, routes)
    if case.fault is not None:
        for route in routes:
            upstreams[route].inject(case.fault, times=3)

    answer = ask(gateway, stream)

    assert answer.elapsed_s <= WITHIN_DEADLINE_S, f"waited {answer.elapsed_s:.2f} s"
    if case.mid_stream:
        # The answer had started: never a faked finish, an explicit error event and no [DONE].
        assert answer.status == 200
        assert answer.text.startswith("Hello") or answer.text.startswith("0 ")
        assert "[DONE]" not in answer.events
        last = json.loads(answer.events[-1])
        assert last["error"]["code"] == "stream_interrupted"
        assert last["error"]["type"] and last["error"]["message"]
        return
    if failing == "one_route":
        assert answer.status == 200, answer.body
        assert answer.headers["x-gateway-provider"] == "lepton"
        assert int(answer.headers["x-gateway-attempts"]) >= 2  # openrouter's, then lepton's
        assert answer.text == "Hello from lepton!"
        if stream:
            assert answer.events[-1] == "[DONE]"
        return
    # every route rate limited: 429 with the smallest Retry-After (issue 12), not a 502
    limited = case.fault is not None and case.fault.kind == "http_429"
    status, code = (504, "deadline_exceeded") if case.stalls else (502, "all_routes_failed")
    if limited:
        status, code = 429, "upstream_rate_limited"
        assert int(answer.headers["retry-after"]) >= 1
    error = assert_error_shape(answer, status)
    assert error["code"] == code
    tried = {attempt["route"].split("/")[0] for attempt in error["attempts"]}
    assert tried <= set(ROUTES) and tried
    if not case.stalls:
        assert tried == set(ROUTES)  # every route had its turn: failover, not a give-up


def test_a_key_echoed_in_an_answer_is_never_relayed(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(**LIMITS)
    key = PROVIDER_KEYS["openrouter"]
    for stream in (False, True):
        upstreams["openrouter"].inject(Fault("echo_key"))
        answer = ask(gateway, stream)
        assert answer.status == 200
        assert answer.headers["x-gateway-provider"] == "openrouter"
        assert key not in answer.text and "[redacted]" in answer.text
        assert answer.text.startswith("you sent Bearer ")
