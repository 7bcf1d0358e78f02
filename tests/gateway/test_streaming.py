"""The stream guard: after the first token a failure ends the stream with an error event and
no [DONE] (or continues a completion on a route with the same weights); a client that hangs
up cancels the upstream call and what was served is recorded once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import CHEAPEST_FIRST, MODEL, Gateway

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
LEPTON = "lepton/wizardlm-2-8x22b"


def sse_events(gateway: Gateway, path: str, body: dict[str, Any]) -> list[str]:
    """The raw `data:` payloads of a streamed answer, [DONE] included when sent."""
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as client,
        client.stream("POST", path, json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "stream": True, **CHEAPEST_FIRST, **extra}


def wait_for(condition: Callable[[], Any], timeout_s: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _content(line: str) -> str:
    """The text of an SSE `data:` line's chunk ("" for [DONE] or a chunk without text)."""
    try:
        chunk = json.loads(line[6:])
    except ValueError:
        return ""
    choices = chunk.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def attempts_on(gateway: Gateway, route_id: str) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        await gateway.state.stats.flush()  # what was recorded, folded (stats/memory.py)
        window = gateway.state.stats.route_health(route_id).windows["5m"]
        return window.requests, window.failures

    result: tuple[int, int] = gateway.call(read())
    return result


@pytest.mark.parametrize("fault", ["cut_after_first", "stall_after_first", "malformed_after_first"])
def test_failure_after_the_first_token_ends_with_an_error_event_and_no_done(
    gateway: Gateway, upstreams: FakeUpstreams, fault: str
) -> None:
    upstreams["openrouter"].inject(Fault(fault, after=2))
    events = sse_events(gateway, "/v1/chat/completions", chat_body())
    assert "[DONE]" not in events
    *chunks, last = [json.loads(e) for e in events]
    served = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert served == "Hello from"  # what the upstream sent before failing, nothing invented
    assert last["error"]["code"] == "stream_interrupted"
    assert last["error"]["type"] == "upstream_error"
    assert last["error"]["attempts"][-1]["route"] == OPENROUTER
    assert not upstreams["lepton"].requests  # chat answers are never continued elsewhere
    assert attempts_on(gateway, OPENROUTER) == (1, 1)  # at once: the router must see it
    # The usage of a failed answer is counted after its response is out (the client is not
    # kept waiting for the tokenizer): it arrives within moments, exactly once.
    usage = settled_usage(gateway, OPENROUTER)
    assert usage.requests == 1 and usage.completion_tokens > 0  # what was served, counted


def settled_usage(gateway: Gateway, route_id: str, timeout_s: float = 5.0) -> Any:
    """The route's usage once its record has arrived (or what there is after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        usage = gateway.usage("route").get(route_id)
        if usage is not None or time.monotonic() > deadline:
            return usage
        time.sleep(0.02)


def test_the_sdk_sees_the_error_after_the_content(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("cut_after_first", after=1))
    stream = gateway.openai().chat.completions.create(
        model=MODEL, messages=HI, stream=True, extra_body=CHEAPEST_FIRST
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert "Hello" in received
    assert "incomplete" in caught.value.message


def test_a_normal_stream_ends_with_done(gateway: Gateway, upstreams: FakeUpstreams) -> None:
    events = sse_events(gateway, "/v1/chat/completions", chat_body())
    assert events[-1] == "[DONE]"
    assert not any("error" in json.loads(e) for e in events[:-1])


def completion_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "stream": True, **CHEAPEST_FIRST, **extra}


def test_a_cut_completion_continues_on_a_route_with_the_same_weights(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("cut_after_first", after=2))
    upstreams["lepton"].tokens = [" lepton", " finishes", "."]
    body = completion_body("Tell a story:", max_tokens=50, stream_options={"include_usage": True})
    events = sse_events(gateway, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "Hello from lepton finishes."
    assert len({c["id"] for c in chunks}) == 1  # one answer to the client
    assert [c["provider"] for c in chunks if c["choices"]][:2] == ["openrouter", "openrouter"]
    assert chunks[-2]["provider"] == "lepton"
    continued = upstreams["lepton"].requests[0]["body"]
    assert continued["prompt"] == "Tell a story:Hello from"
    assert continued["max_tokens"] < 50
    # One attempt and one usage per upstream segment; the client's usage sums them.
    routes = gateway.usage("route")
    assert routes[OPENROUTER].requests == 1 and routes[LEPTON].requests == 1
    assert routes[LEPTON].completion_tokens == 3  # as lepton reported it
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == routes[OPENROUTER].completion_tokens + 3
    assert usage["cost"] == pytest.approx(routes[OPENROUTER].cost_usd + routes[LEPTON].cost_usd)


def test_a_stop_sequence_straddling_the_seam_stops_the_continuation(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].tokens = ["Hello", " wor", "never"]
    upstreams["openrouter"].inject(Fault("cut_after_first", after=2))
    upstreams["lepton"].tokens = ["ld", " and more"]  # "world" only exists across the seam
    events = sse_events(gateway, "/v1/completions", completion_body("Hi:", stop=["world"]))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello wor"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_client_hang_up_cancels_the_upstream_stream_and_records_once(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    lepton = upstreams["lepton"]
    lepton.tokens = [f" t{i}" for i in range(40)]
    lepton.chunk_delay_s = 0.1
    body = chat_body(provider={"only": ["lepton"]})
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        received: list[str] = []
        for line in response.iter_lines():
            if line.startswith("data: ") and _content(line).startswith(" t"):
                received.append(line)
                if len(received) == 2:
                    break
    wait_for(lambda: lepton.disconnects == 1)  # the upstream saw its connection closed
    usage = wait_for(lambda: gateway.usage("route").get(LEPTON))
    assert usage.requests == 1
    assert 2 <= usage.completion_tokens < 40
    assert attempts_on(gateway, LEPTON) == (1, 0)  # the upstream did not fail
    time.sleep(0.3)
    assert gateway.usage("route")[LEPTON].requests == 1  # and nothing is recorded twice


def test_client_hang_up_cancels_a_non_stream_upstream_call(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    lepton = upstreams["lepton"]
    lepton.chunk_delay_s = 0.5  # the fake "generates" for 2 s before answering
    body = {"model": MODEL, "messages": HI, "provider": {"only": ["lepton"]}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=0.3)
    wait_for(lambda: lepton.disconnects == 1)
    assert lepton.served.requests == 0
    assert gateway.usage("route") == {}
