"""Issue 8, the request path: one deadline per request, open circuits skipped, client mistakes
answered 4xx (never a route's failure, never a 5xx), the gateway's own failures never a route's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.api.json_depth import nesting_exceeds
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway

OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
LEPTON = "lepton/wizardlm-2-8x22b"
ROUTES = ("openrouter", "lepton", "novita", "deepinfra")  # cheapest first


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **fields}


def post(gateway: Gateway, body: dict[str, Any] | bytes) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    with gateway.http() as client:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            response = client.post("/v1/chat/completions", content=body, headers=headers)
        else:
            response = client.post("/v1/chat/completions", json=body)
    return response, time.perf_counter() - started


def health(gateway: Gateway, route_id: str) -> Any:
    async def read() -> Any:
        await gateway.state.stats.flush()  # every record folded in (stats/memory.py)
        return gateway.state.stats.route_health(route_id)

    return gateway.call(read())


# -- one deadline per request -----------------------------------------------------------------


def test_every_route_stalling_waits_the_deadline_not_the_sum_of_attempts(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    # Per attempt: 0.3 s connect + 2 s headers; 4 routes x 2 attempts would be ~18 s.
    gateway = start_gateway(request_deadline_s=3.0, timeout_headers_s=2.0)
    for name in ROUTES:
        upstreams[name].inject(Fault("stall_headers"), times=2)
    response, elapsed = post(gateway, chat(provider={"sort": "price"}))
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert elapsed <= 3.0 * 1.1
    assert sum(len(upstreams[name].requests) for name in ROUTES) <= 3


def test_backoff_never_sleeps_past_the_deadline(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(request_deadline_s=0.6, retry_after_cap_s=5.0, retry_budget_s=5.0)
    upstreams["openrouter"].inject(Fault("http_429", retry_after="2"), times=2)
    response, elapsed = post(gateway, chat(provider={"sort": "price"}))
    assert response.status_code == 200  # no 2 s wait for openrouter: lepton at once
    assert response.headers["x-gateway-provider"] == "lepton"
    assert len(upstreams["openrouter"].requests) == 1
    assert elapsed < 0.6


# -- open circuits ------------------------------------------------------------------------------


def test_an_open_circuit_is_skipped_unless_it_is_the_last_candidate(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(retry_attempts_per_route=1)
    for name in ("openrouter", "lepton"):  # open both circuits: 5 consecutive failures each
        upstreams[name].inject(Fault("http_500"), times=5)
        for _ in range(5):
            assert post(gateway, chat(provider={"only": [name]}))[0].status_code == 502
    assert health(gateway, OPENROUTER).circuit == health(gateway, LEPTON).circuit == "open"

    # Healthy routes first; of the two open ones only the very last candidate is tried.
    upstreams["novita"].inject(Fault("http_500"))
    upstreams["deepinfra"].inject(Fault("http_500"))
    response, _ = post(gateway, chat(provider={"sort": "price"}, debug={"attempts": True}))
    assert response.status_code == 200
    tried = [a["route"].split("/")[0] for a in response.json()["attempts"]]
    # openrouter (open, cheaper) is skipped; lepton (open, the last candidate) is tried and,
    # recovered by now, serves.
    assert tried == ["novita", "deepinfra", "lepton"]
    assert len(upstreams["openrouter"].requests) == 5

    # lepton's success closed its circuit: it serves first now; openrouter, the cheapest, is
    # still open and never contacted.
    response, _ = post(gateway, chat(provider={"sort": "price"}))
    assert response.status_code == 200
    assert response.headers["x-gateway-provider"] == "lepton"
    assert response.headers["x-gateway-attempts"] == "1"
    assert len(upstreams["openrouter"].requests) == 5


def test_a_half_open_route_gets_one_probe_at_a_time() -> None:
    from gateway.dispatch.circuit_gate import Admission, CircuitGate
    from gateway.stats.base import RouteHealth

    class Stats:
        circuit = "half_open"

        def route_health(self, route_id: str) -> RouteHealth:
            return RouteHealth(route_id=route_id, circuit=self.circuit)  # type: ignore[arg-type]

    gate = CircuitGate(Stats())  # type: ignore[arg-type]
    assert gate.admit("r", last=False) is Admission.PROBE
    assert gate.admit("r", last=False) is Admission.SKIP  # a probe is in flight
    assert gate.admit("r", last=True) is Admission.TRY  # the last candidate: tried anyway
    gate.release("r")
    assert gate.admit("r", last=False) is Admission.PROBE


# -- request bodies: depth, and the gateway's own failures --------------------------------------


def nested(depth: int) -> bytes:
    inner = '{"a": ' * (depth - 1) + "1" + "}" * (depth - 1)
    body = chat()
    body["metadata"] = "@"
    return json.dumps(body).replace('"@"', inner).encode()


@pytest.mark.parametrize("depth", [65, 990, 1100, 5000])
def test_a_deeply_nested_body_is_a_400_and_never_reaches_a_route(
    gateway: Gateway, upstreams: FakeUpstreams, depth: int
) -> None:
    for _ in range(30 if depth == 990 else 1):
        response, _ = post(gateway, nested(depth))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "nests deeper" in error["message"]
    assert not any(upstreams[name].requests for name in ROUTES)
    for route in (OPENROUTER, LEPTON):
        assert health(gateway, route).circuit == "closed"
        assert health(gateway, route).consecutive_failures == 0


def test_a_body_at_the_depth_limit_is_served(gateway: Gateway) -> None:
    response, _ = post(gateway, nested(63))  # + the body object itself: 64 levels
    assert response.status_code == 200, response.text


def test_nesting_is_measured_outside_strings_only() -> None:
    assert not nesting_exceeds(json.dumps({"text": "[" * 500 + "{" * 500}).encode(), 8)
    assert nesting_exceeds(b"[" * 9 + b"]" * 9, 8)
    assert not nesting_exceeds(b"[" * 8 + b"]" * 8, 8)
    assert not nesting_exceeds(b"[" + b"[]," * 100 + b"[]]", 2)
    assert nesting_exceeds(b'[{"k\\"[": [[]]}]', 3)


class _Provider:
    name = "openrouter"

    def __init__(self, error: Exception):
        self.error = error
        self.calls = 0

    async def chat(self, request: Any) -> Any:
        self.calls += 1
        raise self.error

    async def ready(self) -> bool:
        return True

    def has_capacity(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("kind", ["not_encodable", "bug"])
def test_the_gateways_own_failure_is_never_recorded_against_a_route(
    gateway: Gateway, upstreams: FakeUpstreams, kind: str
) -> None:
    from providers.errors import RequestNotEncodable

    error = RequestNotEncodable("RecursionError") if kind == "not_encodable" else KeyError("x")
    broken = _Provider(error)
    gateway.state.dispatcher.providers["openrouter"] = broken  # type: ignore[assignment]
    for _ in range(6):
        response, _ = post(gateway, chat(provider={"sort": "price"}))
        if kind == "not_encodable":  # every route would fail the same: the client's 400
            assert response.status_code == 400
            assert response.json()["error"]["type"] == "invalid_request_error"
            assert not upstreams["lepton"].requests
        else:  # a bug below us: fail over, say so in the trail, blame no route
            assert response.status_code == 200
            assert response.headers["x-gateway-provider"] == "lepton"
    assert broken.calls == 6
    assert health(gateway, OPENROUTER).consecutive_failures == 0
    assert health(gateway, OPENROUTER).windows["5m"].requests == 0


# -- impossible preferences are the client's mistake -----------------------------------------


@pytest.mark.parametrize(
    ("provider", "status"),
    [
        ({"only": []}, 400),
        ({"max_price": 0}, 400),
        ({"max_price": {"prompt": 0}}, 404),
        ({"max_price": {"prompt": 0, "completion": 0}}, 404),
        ({"only": ["no-such-provider"]}, 404),
        ({"order": ["nobody"], "allow_fallbacks": False}, 404),
        ({"ignore": [*ROUTES, "local"]}, 404),
        # ignoring every configured route leaves one this deployment lacks: its 503, as
        # test_errors.py decides for a provider.only naming an unconfigured provider
        ({"ignore": list(ROUTES)}, 503),
    ],
)
def test_impossible_provider_preferences_are_4xx_not_503(
    gateway: Gateway, upstreams: FakeUpstreams, provider: dict[str, Any], status: int
) -> None:
    response, _ = post(gateway, chat(provider=provider))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if status < 500:
        assert error["type"] == "invalid_request_error"
    assert not any(upstreams[name].requests for name in ROUTES)


def test_no_configured_provider_is_still_the_gateways_503(
    start_gateway: Callable[..., Gateway],
) -> None:
    unset = {f"{name}_api_key": None for name in ROUTES}
    gateway = start_gateway(**unset)
    response, _ = post(gateway, chat())
    assert response.status_code == 503
