"""429s: when every route is rate limited upstream, and per-client limits and daily budgets,
enforced across two gateway replicas sharing one real Redis (own DB and key prefix)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstreams, Fault
from tests.gateway.conftest import MODEL, Gateway
from tests.gateway.routing_fixtures import REDIS_URL, delete_prefix, redis_prefix

HI = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef"
KEYS = [f"alice:{ALICE}", f"bob:{BOB}", "sk-plain-0123456789abcdef"]


def post(gateway: Gateway, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with gateway.http() as http:
        return http.post("/v1/chat/completions", json={**HI, **body}, headers=headers)


def assert_openai_429(response: httpx.Response, code: str) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code
    return int(response.headers["retry-after"])


# -- every route rate limited upstream ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_route_429_is_a_429_with_the_smallest_retry_after(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams, stream: bool
) -> None:
    gateway = start_gateway(novita_api_key=None, deepinfra_api_key=None)
    upstreams["openrouter"].inject(Fault("http_429", retry_after="7"), times=3)
    upstreams["lepton"].inject(Fault("http_429", retry_after="2.5"), times=3)
    response = post(gateway, stream=stream)
    assert assert_openai_429(response, "upstream_rate_limited") == 3  # 2.5 s, rounded up
    attempts = response.json()["error"]["attempts"]
    assert sorted(a["retry_after_s"] for a in attempts) == [2.5, 7.0]
    assert all(a["status"] == 429 for a in attempts)


def test_a_429_and_a_500_is_still_a_502(
    start_gateway: Callable[..., Gateway], upstreams: FakeUpstreams
) -> None:
    gateway = start_gateway(novita_api_key=None, deepinfra_api_key=None)
    upstreams["openrouter"].inject(Fault("http_429", retry_after="7"), times=3)
    upstreams["lepton"].inject(Fault("http_500"), times=3)
    response = post(gateway)
    assert response.status_code == 502 and response.json()["error"]["code"] == "all_routes_failed"


# -- per-client limits -------------------------------------------------------------------------


def test_requests_per_minute_per_named_key(start_gateway: Callable[..., Gateway]) -> None:
    gateway = start_gateway(gateway_api_keys=KEYS, client_requests_per_min=2)
    assert [post(gateway, ALICE).status_code for _ in range(2)] == [200, 200]
    retry_after = assert_openai_429(post(gateway, ALICE), "rate_limit_exceeded")
    assert 1 <= retry_after <= 60
    assert post(gateway, BOB).status_code == 200  # bob has his own window
    assert set(gateway.usage("client")) == {"alice", "bob"}  # names, not hashes


def test_per_key_overrides_and_unlimited_keys(start_gateway: Callable[..., Gateway]) -> None:
    gateway = start_gateway(gateway_api_keys=KEYS, client_limits='{"bob": {"requests_per_min": 1}}')
    assert [post(gateway, ALICE).status_code for _ in range(3)] == [200, 200, 200]
    assert post(gateway, BOB).status_code == 200
    assert_openai_429(post(gateway, BOB), "rate_limit_exceeded")


# -- two replicas, one Redis -------------------------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    value = redis_prefix()
    yield value
    asyncio.run(delete_prefix(value))


def two_replicas(start: Callable[..., Gateway], prefix: str, **limits: Any) -> list[Gateway]:
    shared = {"redis_url": REDIS_URL, "stats_prefix": prefix, "gateway_api_keys": KEYS}
    return [start(**shared, **limits) for _ in range(2)]


def settle(gateway: Gateway) -> None:
    """Wait until the served answers' charges (tokens, spend) reached Redis."""

    async def drain() -> None:
        await asyncio.sleep(0.05)  # the after-response writes run first
        await gateway.app.state.quotas.drain()

    gateway.call(drain())


def test_requests_per_minute_are_shared_by_replicas(
    start_gateway: Callable[..., Gateway], prefix: str
) -> None:
    a, b = two_replicas(start_gateway, prefix, client_requests_per_min=3)
    window = int(time.time()) // 60
    statuses = [post(gw, ALICE).status_code for gw in (a, b, a, b)]
    if int(time.time()) // 60 != window:
        pytest.skip("the minute window turned during the test")
    assert statuses == [200, 200, 200, 429]


def test_tokens_per_minute_are_shared_by_replicas(
    start_gateway: Callable[..., Gateway], prefix: str
) -> None:
    a, b = two_replicas(start_gateway, prefix, client_tokens_per_min=5)
    window = int(time.time()) // 60
    assert post(a, ALICE).status_code == 200  # under the limit when it arrived
    settle(a)  # it used 8 tokens: over the limit of 5
    refused = post(b, ALICE)
    if int(time.time()) // 60 != window:
        pytest.skip("the minute window turned during the test")
    assert_openai_429(refused, "rate_limit_exceeded")
    assert "tokens per minute" in refused.json()["error"]["message"]
    assert post(b, BOB).status_code == 200


def test_daily_budget_is_shared_by_replicas(
    start_gateway: Callable[..., Gateway], prefix: str
) -> None:
    a, b = two_replicas(start_gateway, prefix, client_daily_budget_usd=0.000001)
    served = post(a, ALICE)
    assert served.status_code == 200
    cost = served.json()["usage"]["cost"]
    assert cost > 0.000001  # one answer spends the whole budget
    settle(a)
    spent = b.call(b.app.state.quotas.spent_today("alice"))
    assert spent == pytest.approx(cost, rel=1e-9)  # counted once, exactly
    for replica in (b, a):
        refused = post(replica, ALICE)
        retry_after = assert_openai_429(refused, "insufficient_quota")
        assert refused.json()["error"]["type"] == "insufficient_quota"
        until_midnight = 86_400 - time.time() % 86_400
        assert abs(retry_after - until_midnight) <= 5
    assert post(b, BOB).status_code == 200  # bob's budget is his own


def test_the_budget_resets_with_the_utc_day(
    start_gateway: Callable[..., Gateway], prefix: str
) -> None:
    (a, _) = two_replicas(start_gateway, prefix, client_daily_budget_usd=0.000001)
    assert post(a, ALICE).status_code == 200
    settle(a)
    assert post(a, ALICE).status_code == 429
    quotas = a.app.state.quotas
    quotas.clock = lambda: time.time() + 86_400  # tomorrow
    assert post(a, ALICE).status_code == 200


def test_tokens_and_budget_in_memory_without_redis(start_gateway: Callable[..., Gateway]) -> None:
    gateway = start_gateway(
        gateway_api_keys=KEYS,
        client_limits='{"alice": {"tokens_per_min": 5}, "bob": {"daily_budget_usd": 0.000001}}',
    )
    window = int(time.time()) // 60
    for key, code in ((ALICE, "rate_limit_exceeded"), (BOB, "insufficient_quota")):
        assert post(gateway, key).status_code == 200
        settle(gateway)
        refused = post(gateway, key)
        if int(time.time()) // 60 != window:
            pytest.skip("the minute window turned during the test")
        assert_openai_429(refused, code)


async def test_an_unreachable_redis_lets_requests_through_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.quotas import ClientQuotas
    from tests.gateway.routing_fixtures import hermetic_settings

    settings = hermetic_settings(
        redis_url="redis://:s3cret-pass@127.0.0.1:1/0", client_requests_per_min=1
    )
    quotas = ClientQuotas(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.quotas"):
            for _ in range(3):
                await quotas.check("alice")  # no 429: the limit cannot be known
    finally:
        await quotas.aclose()
    warnings = [r for r in caplog.records if r.name == "gateway.quotas"]
    assert len(warnings) == 1 and "not enforced" in warnings[0].getMessage()
    assert "s3cret-pass" not in caplog.text


async def test_a_redis_that_stops_answering_costs_a_request_at_most_the_quota_timeout() -> None:
    """A Redis that accepts connections but never replies (paused, blackholed) must not hold
    requests: the check gives up after QUOTA_REDIS_TIMEOUT_S and lets the request through."""
    from gateway.quotas import QUOTA_REDIS_TIMEOUT_S, ClientQuotas
    from tests.gateway.routing_fixtures import hermetic_settings

    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # reads nothing
    port = silent.sockets[0].getsockname()[1]
    settings = hermetic_settings(redis_url=f"redis://127.0.0.1:{port}/0", client_requests_per_min=1)
    quotas = ClientQuotas(settings)
    try:
        started = time.perf_counter()
        await asyncio.wait_for(quotas.check("alice"), timeout=10 * QUOTA_REDIS_TIMEOUT_S)
        waited = time.perf_counter() - started
    finally:
        await quotas.aclose()
        silent.close()
    assert waited < 3 * QUOTA_REDIS_TIMEOUT_S
