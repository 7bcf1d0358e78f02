"""GET /v1/models, /v1/models/{id}, /v1/models/{id}/endpoints through create_app."""

from __future__ import annotations

from typing import Any

from gateway.stats.base import Attempt
from tests.gateway.conftest import Gateway
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    LEPTON,
    LOCAL,
    NOVITA,
    WIZARD,
    hermetic_settings,
    real_catalog,
    running_app,
)


async def test_list_is_openai_shaped_and_the_sdk_reads_it() -> None:
    catalog = real_catalog()
    async with running_app(hermetic_settings()) as (_, client):
        response = await client.get("/v1/models")
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "list"
        entries = {m["id"]: m for m in body["data"]}
        for model in catalog.models.values():
            entry = entries[model.id]
            assert entry["object"] == "model" and isinstance(entry["created"], int)
            assert entry["owned_by"] == model.weights.split("/")[0]
            # aliases are a field of their model, not entries of their own (OpenRouter's way)
            names = {a.lower() for a in model.aliases} - {model.id.lower()}
            assert {a.lower() for a in entry["aliases"]} == names
        assert len(body["data"]) == len(catalog.models)


def test_the_openai_sdk_lists_and_retrieves_models(gateway: Gateway) -> None:
    sdk = gateway.openai()
    listed = {m.id: m for m in sdk.models.list()}
    assert set(real_catalog().models) <= set(listed)
    assert listed[WIZARD].owned_by == "microsoft"
    retrieved = sdk.models.retrieve("microsoft/WizardLM-2-8x22B")  # an alias with "/"
    assert retrieved.id == WIZARD and retrieved.owned_by == "microsoft"


async def test_endpoints_per_route_with_prices_status_and_health() -> None:
    settings = hermetic_settings(lepton_api_key="k-lepton", deepinfra_api_key="k-deepinfra")
    async with running_app(settings) as (app, client):
        stats = app.state.gw.stats
        for i in range(10):
            ok = i != 0
            stats.record_attempt(
                Attempt(LEPTON, ok=ok, latency_s=1.0 + i / 10, ttft_s=0.2, completion_tokens=100)
            )
        for _ in range(6):
            stats.record_attempt(Attempt(DEEPINFRA, ok=False, latency_s=0.1, error_kind="http_500"))
        await stats.flush()
        await stats.refresh()

        response = await client.get("/v1/models/microsoft/wizardlm-2-8x22b/endpoints")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["id"] == WIZARD
        endpoints = {e["route"]: e for e in data["endpoints"]}
        routes = {r.id: r for r in real_catalog().models[WIZARD].routes}
        assert set(endpoints) == set(routes)

        lepton = endpoints[LEPTON]
        assert lepton["provider_name"] == "lepton" and lepton["slug"] == "wizardlm-2-8x22b"
        assert lepton["price_per_1m"] == {"input": 0.5, "output": 0.5}
        assert lepton["effective_price_per_1m"]["overridden"] is False
        assert float(lepton["pricing"]["prompt"]) == 0.5e-6  # OpenRouter: USD per token
        assert lepton["context_length"] == routes[LEPTON].context
        assert (lepton["status"], lepton["state"]) == (0, "available")
        assert lepton["uptime"]["5m"] == 0.9 and lepton["uptime_last_30m"] == 90.0
        assert lepton["uptime_last_5m"] == 90.0 and lepton["uptime_last_1d"] == 90.0
        assert 1.0 <= lepton["latency"]["p50_s"] <= 1.9 and lepton["ttft"]["p50_s"] > 0
        assert lepton["tokens_per_s"] > 0

        assert (endpoints[DEEPINFRA]["status"], endpoints[DEEPINFRA]["state"]) == (
            -3,
            "circuit_open",
        )
        assert endpoints[DEEPINFRA]["uptime"]["5m"] == 0.0
        assert (endpoints[NOVITA]["status"], endpoints[NOVITA]["state"]) == (-5, "no_key")
        assert endpoints[NOVITA]["uptime"] == {"5m": None, "30m": None, "1d": None}
        assert (endpoints[LOCAL]["status"], endpoints[LOCAL]["state"]) == (-10, "not_configured")
        assert endpoints[LOCAL]["last_resort"] is True


async def test_endpoints_carry_openrouters_fields() -> None:
    settings = hermetic_settings(lepton_api_key="k-lepton", deepinfra_api_key="k-deepinfra")
    async with running_app(settings) as (app, client):
        stats = app.state.gw.stats
        for i in range(4):  # lepton: 3 successes, then a failure -> degraded, still serving
            stats.record_attempt(
                Attempt(LEPTON, ok=i < 3, latency_s=1.0, ttft_s=0.25, completion_tokens=50)
            )
        await stats.flush()
        await stats.refresh()
        data = (await client.get(f"/v1/models/{WIZARD}/endpoints")).json()["data"]
    endpoints = {e["route"]: e for e in data["endpoints"]}
    lepton, deepinfra = endpoints[LEPTON], endpoints[DEEPINFRA]
    assert (lepton["status"], lepton["state"]) == (-1, "degraded")
    assert lepton["model_name"] == "WizardLM-2 8x22B" and lepton["quantization"] == "unknown"
    assert lepton["uptime_last_30m"] == 75.0
    latency = lepton["latency_last_30m"]
    assert set(latency) == {"p50", "p75", "p90", "p99"}
    assert abs(latency["p50"] - 0.25) < 0.02 and latency["p75"] is None
    assert lepton["throughput_last_30m"]["p50"] > 0
    assert deepinfra["latency_last_30m"]["p50"] is None  # no traffic, no made-up figure
    # the router's own limit: DeepInfra reserves its default 512 completion tokens
    assert lepton["max_prompt_tokens"] == 65535 and deepinfra["max_prompt_tokens"] == 65536 - 512
    assert "temperature" in lepton["supported_parameters"]
    for route in real_catalog().models[WIZARD].routes:
        supported = set(endpoints[route.id]["supported_parameters"])
        assert not supported & route.unsupported_params


async def test_unknown_model_is_an_openai_404() -> None:
    async with running_app(hermetic_settings()) as (_, client):
        for path in ("/v1/models/gpt-4/endpoints", "/v1/models/nope/nope"):
            response = await client.get(path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "model_not_found"


async def test_client_key_required_when_configured() -> None:
    settings = hermetic_settings(gateway_api_keys="client-key-1")
    async with running_app(settings) as (_, client):
        for path in ("/v1/models", f"/v1/models/{WIZARD}/endpoints", f"/v1/models/{WIZARD}"):
            assert (await client.get(path)).status_code == 401
            auth: dict[str, Any] = {"authorization": "Bearer client-key-1"}
            assert (await client.get(path, headers=auth)).status_code == 200
