"""Usage accounting: the stats store's totals equal what the upstreams served (real Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from gateway.api.auth import key_id
from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import CHEAPEST_FIRST, MODEL, Gateway

REDIS_URL = "redis://127.0.0.1:6379/11"  # not DB 0; keys under a per-test prefix
CLIENT_KEYS = ["client-alpha-0123456789", "client-beta-0123456789"]
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count my tokens please"}]


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 (make redis)")
    prefix = f"moegw-usage-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)  # only what this test created
    client.close()


def only(provider: str) -> dict[str, Any]:
    return {"provider": {"only": [provider]}}


def test_usage_totals_in_redis_equal_what_the_upstreams_served(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, redis_prefix: str
) -> None:
    gateway = start_gateway(
        redis_url=REDIS_URL, stats_prefix=redis_prefix, gateway_api_keys=",".join(CLIENT_KEYS)
    )
    alpha, beta = gateway.openai(CLIENT_KEYS[0]), gateway.openai(CLIENT_KEYS[1])
    for _ in range(3):
        alpha.chat.completions.create(model=MODEL, messages=HI, extra_body=CHEAPEST_FIRST)
    for _ in range(2):
        list(
            beta.chat.completions.create(
                model=MODEL,
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=only("lepton"),
            )
        )
    list(
        beta.chat.completions.create(
            model=MODEL, messages=HI, stream=True, extra_body=only("novita")
        )
    )
    alpha.completions.create(model=MODEL, prompt="one two three", extra_body=only("deepinfra"))
    alpha.chat.completions.create(  # DeepInfra's sample body: 15 + 16 tokens
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], extra_body=only("deepinfra")
    )
    upstreams["openrouter"].inject(Fault("http_500"), times=2)  # fails over to lepton
    beta.chat.completions.create(model=MODEL, messages=HI, extra_body=CHEAPEST_FIRST)
    upstreams["openrouter"].inject(Fault("http_500"), times=8)  # ... and this one fails
    for name in ("lepton", "novita", "deepinfra"):
        upstreams[name].inject(Fault("http_500"), times=2)
    with pytest.raises(Exception, match="502"):
        beta.chat.completions.create(model=MODEL, messages=HI, extra_body=CHEAPEST_FIRST)

    by_route = gateway.usage("route")
    routes = {r.provider: r for r in gateway.state.catalog.models[MODEL].routes}
    expected_cost = 0.0
    for name, fake in upstreams.providers.items():
        totals = by_route[routes[name].id]
        served = fake.served
        assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (
            served.requests,
            served.prompt_tokens,
            served.completion_tokens,
        ), name
        route = routes[name]
        expected_cost += (
            served.prompt_tokens * route.input_price + served.completion_tokens * route.output_price
        ) / 1e6
    assert sum(t.cost_usd for t in by_route.values()) == pytest.approx(expected_cost, rel=1e-6)
    assert sum(f.served.requests for f in upstreams.providers.values()) == 9

    by_client = gateway.usage("client")
    assert set(by_client) == {key_id(CLIENT_KEYS[0]), key_id(CLIENT_KEYS[1])}
    assert by_client[key_id(CLIENT_KEYS[0])].requests == 5
    assert by_client[key_id(CLIENT_KEYS[1])].requests == 4
    assert by_client[key_id(CLIENT_KEYS[0])].prompt_tokens > 0
    assert gateway.usage("model")[MODEL].requests == 9

    # Another replica on the same Redis sees the same totals.
    replica = start_gateway(redis_url=REDIS_URL, stats_prefix=redis_prefix)
    assert replica.usage("route") == by_route


def test_usage_is_counted_with_the_tokenizer_when_the_upstream_reports_none(
    gateway: Gateway, upstreams: FakeUpstreams
) -> None:
    upstreams["lepton"].inject(Fault("no_usage"), times=2)
    counter = gateway.state.dispatcher.accountant.counter
    model = gateway.state.catalog.models[MODEL]
    body = {"model": MODEL, "messages": HI}
    expected = (counter.count(model, body, "chat"), counter.count_text(model, "Hello from lepton!"))

    reply = gateway.openai().chat.completions.create(
        model=MODEL, messages=HI, extra_body=only("lepton")
    )
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == expected

    chunks = list(
        gateway.openai().chat.completions.create(
            model=MODEL,
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=only("lepton"),
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == expected
    totals = gateway.usage("route")["lepton/wizardlm-2-8x22b"]
    assert (totals.requests, totals.prompt_tokens, totals.completion_tokens) == (
        2,
        2 * expected[0],
        2 * expected[1],
    )
