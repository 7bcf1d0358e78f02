"""The official `openai` SDK (sync and async, stream and non-stream) against the gateway."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.upstream import FakeUpstreams, prompt_tokens_of
from tests.gateway.conftest import CHEAPEST_FIRST, MODEL, Gateway

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the tests"}]


def only(provider: str) -> dict[str, Any]:
    return {"provider": {"only": [provider]}}


def served_by(upstreams: FakeUpstreams) -> list[str]:
    return [name for name, fake in upstreams.providers.items() if fake.requests]


def expected_cost(gateway: Gateway, route_id: str, prompt: int, completion: int) -> float:
    route = next(r for r in gateway.state.catalog.routes() if r.id == route_id)
    input_price, output_price = gateway.state.prices.effective(route)
    return (prompt * input_price + completion * output_price) / 1e6


def test_sync_non_stream_is_served_by_the_cheapest_route(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    raw = gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, extra_body=CHEAPEST_FIRST
    )
    reply = raw.parse()
    assert served_by(upstreams) == ["openrouter"]  # 0.48/M: the cheapest WizardLM-2 route
    assert reply.choices[0].message.content == "Hello from openrouter!"
    assert reply.model == MODEL
    assert reply.model_extra is not None and reply.model_extra["provider"] == "openrouter"
    assert raw.headers["x-gateway-provider"] == "openrouter"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert float(raw.headers["x-gateway-overhead-ms"]) >= 0
    assert reply.usage is not None
    prompt = prompt_tokens_of({"messages": HI})
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, 4)
    cost = expected_cost(gateway, "openrouter/microsoft/wizardlm-2-8x22b", prompt, 4)
    assert reply.usage.model_extra is not None
    assert reply.usage.model_extra["cost"] == pytest.approx(cost, rel=1e-9)
    # OpenRouter's own figure is kept aside, never as our cost.
    assert reply.usage.model_extra["cost_details"] == {"upstream_inference_cost": 0.000123}


def test_default_order_serves_from_a_configured_route_and_says_which(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    raw = gateway.openai().chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    reply = raw.parse()
    assert served_by(upstreams) == [raw.headers["x-gateway-provider"]]
    assert reply.model_extra is not None
    assert reply.model_extra["provider"] == raw.headers["x-gateway-provider"]


def test_sync_stream_chunks_carry_the_provider_and_usage_comes_last(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    stream = gateway.openai().chat.completions.create(
        model=MODEL,
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=only("lepton"),
    )
    chunks = list(stream)
    assert all(c.model_extra and c.model_extra["provider"] == "lepton" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from lepton!"
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    prompt = prompt_tokens_of(upstreams["lepton"].requests[0]["body"])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, 4)
    cost = expected_cost(gateway, "lepton/wizardlm-2-8x22b", prompt, 4)
    assert last.usage.model_extra is not None
    assert last.usage.model_extra["cost"] == pytest.approx(cost, rel=1e-9)


def test_stream_without_include_usage_gets_no_usage_chunk_but_upstream_was_asked(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    chunks = list(
        gateway.openai().chat.completions.create(
            model=MODEL, messages=HI, stream=True, extra_body=only("novita")
        )
    )
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = upstreams["novita"].requests[0]["body"]
    assert sent["stream_options"] == {"include_usage": True}


async def test_async_client_stream_and_non_stream(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    client = gateway.async_openai()
    reply = await client.chat.completions.create(
        model=MODEL, messages=HI, extra_body=only("deepinfra")
    )
    assert reply.choices[0].message.content == "Hello from deepinfra!"
    stream = await client.chat.completions.create(
        model=MODEL, messages=HI, stream=True, extra_body=only("deepinfra")
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from deepinfra!"
    await client.close()


def test_deepinfra_sample_stream_reaches_the_client_without_the_leaked_eos(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    chunks = list(
        gateway.openai().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello!"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=only("deepinfra"),
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "  Hi!" and "</s>" not in text
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_every_standard_field_and_unknown_extras_pass_through(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    fields: dict[str, Any] = {
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "stop": ["\n\n", "END"],
        "n": 1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 42,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 3,
        "user": "user-1234",
        "logit_bias": {"50256": -100},
    }
    extras = {"repetition_penalty": 1.1, "top_k": 40, "some_future_field": {"x": [1, 2]}}
    gateway.openai().chat.completions.create(
        model="microsoft/WizardLM-2-8x22B",  # an alias: each route gets its own slug
        messages=HI,
        **fields,
        extra_body={**extras, "provider": {"only": ["deepinfra"]}, "debug": {"attempts": True}},
    )
    sent = upstreams["deepinfra"].requests[0]["body"]
    assert sent == {"model": "microsoft/WizardLM-2-8x22B", "messages": HI, **fields, **extras}


def test_completions_endpoint_stream_and_non_stream(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    client = gateway.openai()
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, extra_body=only("novita")
    )
    assert reply.choices[0].text == "Hello from novita!"
    assert reply.model_extra is not None and reply.model_extra["provider"] == "novita"
    assert upstreams["novita"].requests[0]["path"] == "/novita/v1/completions"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
            extra_body=only("novita"),
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from novita!"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_openrouter_gets_its_attribution_headers(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    gateway.openai().chat.completions.create(
        model=MODEL, messages=HI, extra_body=only("openrouter")
    )
    headers = upstreams["openrouter"].requests[0]["headers"]
    assert headers["http-referer"] == "https://example.test/app"
    assert headers["x-title"] == "gateway tests"
    assert "x-title" not in upstreams.providers["openrouter"].requests[0]["body"]


def test_mixtral_goes_to_its_only_route(gateway: Gateway, upstreams: FakeUpstreams) -> None:
    reply = gateway.openai().chat.completions.create(
        model="mistralai/Mixtral-8x22B-Instruct-v0.1", messages=HI
    )
    assert reply.model == "mixtral-8x22b-instruct"
    assert (
        upstreams["openrouter"].requests[0]["body"]["model"] == "mistralai/mixtral-8x22b-instruct"
    )


@pytest.mark.parametrize("how", ["header", "body"])
def test_attempts_trail_when_asked(gateway: Gateway, upstreams: FakeUpstreams, how: str) -> None:
    extra_body: dict[str, Any] = dict(CHEAPEST_FIRST)
    extra_headers = {}
    if how == "header":
        extra_headers["x-gateway-debug"] = "attempts"
    else:
        extra_body["debug"] = {"attempts": True}
    raw = gateway.openai().chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, extra_body=extra_body, extra_headers=extra_headers
    )
    body = json.loads(raw.text)
    assert [(a["route"], a["ok"]) for a in body["attempts"]] == [
        ("openrouter/microsoft/wizardlm-2-8x22b", True)
    ]
    assert "debug" not in upstreams["openrouter"].requests[0]["body"]


def test_no_attempts_trail_unless_asked(gateway: Gateway) -> None:
    raw = gateway.openai().chat.completions.with_raw_response.create(model=MODEL, messages=HI)
    assert "attempts" not in json.loads(raw.text)


def test_cost_uses_the_price_books_overrides(gateway: Gateway, upstreams: FakeUpstreams) -> None:
    route_id = "lepton/wizardlm-2-8x22b"
    gateway.call(gateway.state.prices.set(route_id, 10.0, 20.0))
    reply = gateway.openai().chat.completions.create(
        model=MODEL, messages=HI, extra_body=only("lepton")
    )
    assert reply.usage is not None and reply.usage.model_extra is not None
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    assert reply.usage.model_extra["cost"] == pytest.approx((prompt * 10 + completion * 20) / 1e6)
