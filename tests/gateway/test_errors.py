"""Every failure leaves in OpenAI's error shape, with the right status, and nothing secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, PROVIDER_KEYS, Gateway

HI = [{"role": "user", "content": "hello"}]


def post(
    gateway: Gateway, body: Any, path: str = "/v1/chat/completions", **kw: Any
) -> httpx.Response:
    with gateway.http() as client:
        if isinstance(body, bytes):
            return client.post(
                path, content=body, headers={"content-type": "application/json"}, **kw
            )
        return client.post(path, json=body, **kw)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["type"]
    assert "Traceback" not in response.text
    return error


def test_bad_json_is_400(gateway: Gateway) -> None:
    error = error_of(post(gateway, b'{"model": "x", '), 400)
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]
    assert "JSON object" in error_of(post(gateway, b"[1, 2]"), 400)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": HI, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": HI, "max_tokens": True}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": HI}, "model"),
    ],
)
def test_schema_errors_name_the_field(gateway: Gateway, body: dict[str, Any], param: str) -> None:
    error = error_of(post(gateway, body), 400)
    assert error["code"] == "invalid_request" and error["param"] == param


def test_completions_schema(gateway: Gateway) -> None:
    error = error_of(post(gateway, {"model": MODEL, "prompt": 5}, "/v1/completions"), 400)
    assert error["param"] == "prompt"


def test_unknown_model_is_404(gateway: Gateway) -> None:
    error = error_of(post(gateway, {"model": "gpt-9", "messages": HI}), 404)
    assert error["code"] == "model_not_found"


def test_context_too_long_for_every_route_is_400(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 65536}
    error = error_of(post(gateway, body), 400)
    assert error["code"] == "context_length_exceeded"


def test_body_over_the_limit_is_413_by_header_and_by_bytes(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(max_body_bytes=2048)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]}
    assert error_of(post(gateway, big), 413)["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        raw = json.dumps(big).encode()
        for i in range(0, len(raw), 512):
            yield raw[i : i + 512]

    with gateway.http() as client:
        response = client.post("/v1/chat/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert error_of(response, 413)["code"] == "payload_too_large"


def test_no_eligible_route_is_503_saying_why_for_each(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(lepton_api_key=None)
    body = {"model": MODEL, "messages": HI, "provider": {"only": ["lepton"]}}
    error = error_of(post(gateway, body), 503)
    assert error["code"] == "no_eligible_route"
    skipped = error["skipped"]
    assert "LEPTON_API_KEY" in skipped["lepton/wizardlm-2-8x22b"]
    assert skipped["deepinfra/microsoft/WizardLM-2-8x22B"] == "not in provider.only"
    assert len(skipped) == 5


def test_client_keys_are_required_when_configured(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(gateway_api_keys="good-key-123456")
    body = {"model": MODEL, "messages": HI}
    assert error_of(post(gateway, body), 401)["code"] == "invalid_api_key"
    wrong = post(gateway, body, headers={"authorization": "Bearer nope"})
    assert error_of(wrong, 401)["message"] == "invalid API key"
    assert not any(f.requests for f in upstreams.providers.values())  # never forwarded
    ok = post(gateway, body, headers={"authorization": "Bearer good-key-123456"})
    assert ok.status_code == 200


def test_unknown_paths_and_methods_in_openai_shape(gateway: Gateway) -> None:
    with gateway.http() as client:
        assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
        assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_an_unexpected_exception_is_a_500_without_details(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    secret = PROVIDER_KEYS["lepton"]

    async def broken(body: Any, endpoint: str) -> Any:
        raise RuntimeError(f"router bug while holding {secret}")

    gateway.state.router.aplan = broken  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR):
        error = error_of(post(gateway, {"model": MODEL, "messages": HI}), 500)
    assert error == {"message": "internal error", "type": "api_error", "code": None}
    assert "router bug" in caplog.text  # logged for us ...
    assert secret not in caplog.text  # ... with the key scrubbed


def test_no_key_in_responses_or_logs_when_upstreams_echo_it(
    gateway: Gateway, upstreams: FakeUpstreams, caplog: pytest.LogCaptureFixture
) -> None:
    for name in upstreams.providers:
        upstreams[name].inject(Fault("http_500"), times=2)
    with caplog.at_level(logging.DEBUG):
        response = post(gateway, {"model": MODEL, "messages": HI})
    error = error_of(response, 502)
    assert len(error["attempts"]) == 8
    assert "internal error while serving Bearer [redacted]" in error["attempts"][0]["message"]
    for key in PROVIDER_KEYS.values():
        assert key not in response.text and key not in caplog.text


def test_livez_readyz_and_metrics(gateway: Gateway) -> None:
    with gateway.http() as client:
        assert client.get("/livez").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["providers"] == dict.fromkeys(
            ["lepton", "novita", "openrouter", "deepinfra"], True
        )
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'moegw_attempts_total{outcome="ok"' in metrics.text


def test_readyz_is_503_without_providers(start_gateway: Callable[..., Gateway]) -> None:
    keys = {f"{name}_api_key": None for name in PROVIDER_KEYS}
    gateway = start_gateway(**keys)
    with gateway.http() as client:
        not_ready = client.get("/readyz")
        assert client.get("/livez").status_code == 200
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["reason"] == "no provider is configured"
    # Redis down is degraded, not unready (tests/gateway/test_probes.py)
