"""Faults before the first token: retried and failed over silently; after every route: 502.

Routes are tried cheapest first (provider.sort=price): openrouter, lepton, novita, deepinfra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from tests.fakes.server import free_port
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import CHEAPEST_FIRST, MODEL, Gateway

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
LEPTON = "lepton/wizardlm-2-8x22b"


def attempts_on(gateway: Gateway, route_id: str) -> tuple[int, int]:
    """(attempts, failures) the stats store recorded for a route in the last 5 minutes."""

    async def read() -> tuple[int, int]:
        await gateway.state.stats.flush()  # what was recorded, folded (stats/memory.py)
        window = gateway.state.stats.route_health(route_id).windows["5m"]
        return window.requests, window.failures

    result: tuple[int, int] = gateway.call(read())
    return result


def ask(gateway: Gateway, stream: bool) -> tuple[str, dict[str, str]]:
    """One request through the SDK: (the answer's text, the response headers)."""
    client = gateway.openai()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, stream=stream, extra_body=CHEAPEST_FIRST
    )
    answer = raw.parse()
    if isinstance(answer, ChatCompletion):
        return answer.choices[0].message.content or "", dict(raw.headers)
    chunks = list(answer)
    assert all(c.model_extra and c.model_extra["provider"] == "lepton" for c in chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), dict(raw.headers)


# fault, how many times it is injected, which attempts fail on openrouter before lepton serves.
# Retryable faults (5xx, timeouts, cuts) are retried once on the same route
# (retry_attempts_per_route=2), the others fail over at once.
BEFORE_FIRST_TOKEN = [
    ("http_500", 2, 2),
    ("http_401", 1, 1),
    ("stall_headers", 2, 2),
    ("stall_first_token", 2, 2),
    ("malformed", 1, 1),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("fault", "times", "failed"), BEFORE_FIRST_TOKEN)
def test_failure_before_the_first_token_fails_over_silently(
    gateway: Gateway, upstreams: FakeUpstreams, fault: str, times: int, failed: int, stream: bool
) -> None:
    upstreams["openrouter"].inject(Fault(fault), times=times)
    text, headers = ask(gateway, stream)
    assert text == "Hello from lepton!"
    assert headers["x-gateway-provider"] == "lepton"
    assert headers["x-gateway-attempts"] == str(failed + 1)
    assert len(upstreams["openrouter"].requests) == failed
    # Exactly one attempt recorded per upstream call, failures on the failing route only.
    assert attempts_on(gateway, OPENROUTER) == (failed, failed)
    assert attempts_on(gateway, LEPTON) == (1, 0)


def test_stream_cut_before_the_first_token_fails_over(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("cut_before_first"), times=2)
    text, headers = ask(gateway, stream=True)
    assert text == "Hello from lepton!" and headers["x-gateway-attempts"] == "3"
    assert attempts_on(gateway, OPENROUTER) == (2, 2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_refused_connection_fails_over(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, stream: bool
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gateway = start_gateway(openrouter_base_url=dead)
    text, headers = ask(gateway, stream)
    assert text == "Hello from lepton!"
    assert headers["x-gateway-attempts"] == "3"  # connect errors are retried once
    assert attempts_on(gateway, OPENROUTER) == (2, 2)


def test_a_transient_500_is_retried_on_the_same_route(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("http_500"))
    text, headers = ask(gateway, stream=False)
    assert text == "Hello from openrouter!"  # the cheapest route still serves
    assert headers["x-gateway-attempts"] == "2"
    assert attempts_on(gateway, OPENROUTER) == (2, 1)
    assert not upstreams["lepton"].requests


def test_retry_after_within_the_cap_is_honoured(gateway: Gateway, upstreams: FakeUpstreams) -> None:
    upstreams["openrouter"].inject(Fault("http_429", retry_after="0.6"))
    started = time.monotonic()
    text, headers = ask(gateway, stream=False)
    assert text == "Hello from openrouter!" and headers["x-gateway-attempts"] == "2"
    assert time.monotonic() - started >= 0.6  # waited what the upstream asked, then retried


def test_retry_after_above_the_cap_falls_back_at_once(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("http_429", retry_after="30"), times=5)
    started = time.monotonic()
    text, headers = ask(gateway, stream=True)
    assert text == "Hello from lepton!" and headers["x-gateway-attempts"] == "2"
    assert time.monotonic() - started < 1.0  # no waiting for 30 s, no retry on openrouter
    assert len(upstreams["openrouter"].requests) == 1


def test_retry_after_as_an_http_date_is_understood(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    import email.utils

    later = email.utils.formatdate(time.time() + 60, usegmt=True)  # above the 1 s cap
    upstreams["openrouter"].inject(Fault("http_429", retry_after=later))
    raw = gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HI,
        extra_body={**CHEAPEST_FIRST, "debug": {"attempts": True}},
    )
    first = json.loads(raw.text)["attempts"][0]
    assert first["status"] == 429 and first["retry_after_s"] == pytest.approx(60, abs=2)
    assert raw.headers["x-gateway-provider"] == "lepton"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_route_failing_is_a_502_with_the_attempts(
    gateway: Gateway, upstreams: FakeUpstreams, stream: bool
) -> None:
    for name in upstreams.providers:
        upstreams[name].inject(Fault("http_500"), times=2)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(gateway, stream)
    assert caught.value.status_code == 502
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    assert error["code"] == "all_routes_failed" and error["type"] == "upstream_error"
    routes = [a["route"] for a in error["attempts"]]
    assert len(routes) == 8 and routes[:2] == [OPENROUTER, OPENROUTER]
    assert {a["error"] for a in error["attempts"]} == {"http_500"}
    # The fakes echo our key in their 500 bodies: it must not come back to the client.
    assert "sk-test" not in json.dumps(error)


def test_an_upstream_400_is_the_clients_error_and_not_retried(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["openrouter"].inject(Fault("http_400"))
    with pytest.raises(openai.BadRequestError) as caught:
        ask(gateway, stream=False)
    assert "bad parameter" in caught.value.message
    assert not upstreams["lepton"].requests


def test_the_local_backend_is_the_route_of_last_resort(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    local = FakeUpstreams(["local"]).start()  # our backend's server speaks the same API
    try:
        gateway = start_gateway(local_base_url=local.base_url("local"))
        for name in upstreams.providers:
            upstreams[name].inject(Fault("http_500"), times=2)
        raw = gateway.openai().chat.completions.with_raw_response.create(
            model=MODEL, messages=HI, extra_body=CHEAPEST_FIRST
        )
        assert raw.headers["x-gateway-provider"] == "local"
        assert raw.headers["x-gateway-attempts"] == "9"  # 4 hosted routes x 2, then local
        assert raw.parse().choices[0].message.content == "Hello from local!"
        chats = [r for r in local["local"].requests if r["path"].endswith("/chat/completions")]
        assert chats[0]["body"]["model"] == "wizardlm-2-8x22b"  # (the rest polled /readyz)
    finally:
        local.stop()
