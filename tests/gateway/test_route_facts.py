"""The router's cached route facts give the same plans as evaluating every filter each time."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from gateway.prices import PriceBook
from gateway.routing import available_from
from gateway.routing.availability import NotConfigured
from gateway.routing.filters import Asked, Limits, requested_max_tokens, skip_reason
from gateway.routing.prefs import DEFAULT_PREFS, parse_provider_prefs
from gateway.routing.prompt import PromptText
from gateway.routing.route_facts import RouteFacts
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    HOSTED,
    LEPTON,
    LOCAL,
    WIZARD,
    chat,
    make_router,
    real_catalog,
    small_catalog,
)

PREFS: list[dict[str, Any] | None] = [
    None,
    {"sort": "price"},
    {"only": ["lepton", "deepinfra"]},
    {"ignore": ["novita"]},
    {"order": ["deepinfra"], "allow_fallbacks": False},
    {"max_price": {"prompt": 0.55}},
    {"require_parameters": True},
]
EXTRAS: list[dict[str, Any]] = [
    {},
    {"n": 3},
    {"stop": [str(i) for i in range(17)]},
    {"logit_bias": {"1": 2}},
    {"max_tokens": 100_000},  # above every context: no route fits
]


def ids(plan: Any) -> list[str]:
    return [route.id for route in plan.candidates]


def expected_skips(router: Any, body: dict[str, Any], available: Any) -> dict[str, str]:
    """Every route's reason from filters.skip_reason on a fresh evaluation (no cache)."""
    model = router.resolve(body["model"])
    provider = body.get("provider")
    prefs = DEFAULT_PREFS if provider is None else parse_provider_prefs(provider)
    asked, max_tokens = Asked.of(body), requested_max_tokens(body)
    tokens = PromptText.of(body, "chat").estimate
    out = {}
    for route in model.routes:
        limits = Limits.of(router.catalog.providers[route.provider])
        unavailable = router.unavailable(route)
        facts = RouteFacts.of(
            route, limits, router._prices, prefs, asked, max_tokens, unavailable, False
        )
        e = facts.evaluate(tokens, tokens, max_tokens, True, unavailable)
        reason = skip_reason(e, limits, prefs, asked)
        if reason is not None:
            out[route.id] = reason
    return out


@pytest.mark.parametrize("provider", PREFS)
def test_plans_match_a_fresh_evaluation_cold_and_warm(provider: dict[str, Any] | None) -> None:
    available = {"lepton", "deepinfra", "openrouter"}  # novita and local: not configured
    router = make_router(real_catalog(), available=available, seed=3)
    for extra, _ in itertools.product(EXTRAS, range(2)):  # the second round: all cached
        body = chat(provider=provider, **extra) if provider else chat(**extra)
        want = expected_skips(router, body, available)
        try:
            plan = router.plan(body)
        except Exception as exc:  # no route left, or none fits: every route had a reason
            assert len(want) == len(router.resolve(WIZARD).routes), exc
            continue
        assert {k: v for k, v in plan.skipped.items() if "first choice only" not in v} == want
        assert {r.id for r in plan.candidates} | set(plan.skipped) == {
            r.id for r in router.resolve(WIZARD).routes
        }
        novita = plan.skipped.get("novita/microsoft/wizardlm-2-8x22b", "")
        assert isinstance(novita, NotConfigured) or "provider." in novita


def test_one_router_serving_every_preference_in_turn_plans_each_right() -> None:
    """The facts cache is keyed by the `provider` object too: plans for different preferences
    from one warm router must never borrow each other's facts."""
    available = {"lepton", "deepinfra", "openrouter"}
    router = make_router(real_catalog(), available=available, seed=3)
    for _, extra, provider in itertools.product(range(2), EXTRAS, PREFS):
        body = chat(provider=provider, **extra) if provider else chat(**extra)
        want = expected_skips(router, body, available)
        try:
            plan = router.plan(body)
        except Exception as exc:
            assert len(want) == len(router.resolve(WIZARD).routes), exc
            continue
        assert {k: v for k, v in plan.skipped.items() if "first choice only" not in v} == want


async def test_a_price_change_reaches_a_warm_cache_at_once() -> None:
    catalog = real_catalog()
    prices = PriceBook(catalog)
    router = make_router(catalog, available=set(HOSTED), prices=prices, seed=1)
    body = chat(max_tokens=10, provider={"max_price": {"prompt": 0.55}})
    before = router.plan(body)
    assert DEEPINFRA in before.skipped and "max_price" in before.skipped[DEEPINFRA]
    await prices.set(DEEPINFRA, 0.05, 0.05)
    after = router.plan(body)
    assert DEEPINFRA in {r.id for r in after.candidates}
    assert after.estimated_cost[DEEPINFRA] == pytest.approx(
        (after.prompt_tokens * 0.05 + 10 * 0.05) / 1e6
    )


def test_capacity_is_asked_on_every_plan_not_cached() -> None:
    class Local:
        accepting = True

        def has_capacity(self) -> bool:
            return self.accepting

    class Hosted:
        def has_capacity(self) -> bool:
            return True

    local = Local()
    router = make_router(available=available_from({"lepton": Hosted(), "local": local}))
    assert LOCAL in ids(router.plan(chat()))
    local.accepting = False
    plan = router.plan(chat())
    assert LOCAL not in ids(plan) and plan.skipped[LOCAL] == "at capacity"
    local.accepting = True
    assert LOCAL in ids(router.plan(chat()))
    assert LEPTON in ids(router.plan(chat()))


def test_output_limit_and_context_near_the_limit_still_decided_per_request() -> None:
    router = make_router(small_catalog(), available={"lepton", "novita", "deepinfra"})
    small = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    assert router.plan({**small, "max_tokens": 100}).candidates
    # DeepInfra reserves its default 512 tokens: a bound of ~716 tokens fits the others only
    long = {**small, "messages": [{"role": "user", "content": "word " * 100}]}
    plan = router.plan(long)  # a warm cache, but the size decides here
    assert "context" in plan.skipped["deepinfra/org/Small"]
    assert {"lepton/small", "novita/org/small"} <= set(ids(plan))
    assert "deepinfra/org/Small" in ids(router.plan(small))  # the short one fits it again
    with pytest.raises(Exception, match="output limit"):
        router.plan({"model": "small-long", "messages": small["messages"], "max_tokens": 301})
