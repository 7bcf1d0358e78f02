"""Router: candidates, filters and order (1/price² load balancing, health, `provider`, `models`)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from gateway.catalog import build_catalog
from gateway.errors import InvalidRequest, ModelNotFound, NoEligibleRoute
from gateway.prices import PriceBook
from gateway.routing import available_from
from tests.gateway.routing_fixtures import (
    DEEPINFRA,
    HOSTED,
    LEPTON,
    LOCAL,
    NOVITA,
    OPENROUTER,
    OPENROUTER_MIXTRAL,
    WIZARD,
    FakeStats,
    chat,
    health,
    make_router,
    real_catalog,
    small_catalog,
    small_catalog_data,
)

HOSTED_WIZARD = (LEPTON, NOVITA, OPENROUTER, DEEPINFRA)


def ids(plan: Any) -> list[str]:
    return [route.id for route in plan.candidates]


# -- load balancing: 1/price² ----------------------------------------------------------------------


def test_first_choice_frequencies_follow_inverse_square_price() -> None:
    catalog = real_catalog()
    routes = {r.id: r for r in catalog.models[WIZARD].routes}
    assert all(routes[r].input_price == routes[r].output_price for r in HOSTED_WIZARD)
    weight = {r: 1 / routes[r].input_price ** 2 for r in HOSTED_WIZARD}
    total = sum(weight.values())
    expected_first = {r: w / total for r, w in weight.items()}
    # sequential sampling: P(second = j) = sum_i P(first = i) * w_j / (total - w_i)
    expected_second = {
        j: sum(expected_first[i] * weight[j] / (total - weight[i]) for i in weight if i != j)
        for j in weight
    }

    router = make_router(catalog, seed=12345)
    draws = 20_000
    first: Counter[str] = Counter()
    second: Counter[str] = Counter()
    for _ in range(draws):
        order = ids(router.plan(chat(max_tokens=100)))
        assert sorted(order) == sorted(HOSTED_WIZARD)  # no key for local: never a candidate
        first[order[0]] += 1
        second[order[1]] += 1

    assert first.most_common(1)[0][0] == OPENROUTER  # the cheapest (0.48) wins most often
    for expected, seen in ((expected_first, first), (expected_second, second)):
        for route, p in expected.items():
            sigma = math.sqrt(p * (1 - p) / draws)
            assert abs(seen[route] / draws - p) < 4.5 * sigma, (route, seen[route] / draws, p)


def _two_mix_catalog() -> Any:
    data = small_catalog_data()
    data["models"]["small"]["routes"] = [
        {"provider": "lepton", "slug": "cheap-in", "input": 0.1, "output": 1.0},
        {"provider": "novita", "slug": "cheap-out", "input": 1.0, "output": 0.1},
    ]
    return build_catalog(data, source="mix.yaml")


def test_weights_use_this_requests_token_mix() -> None:
    router = make_router(_two_mix_catalog(), available={"lepton", "novita"}, seed=3)
    long_prompt = chat("word " * 150, model="small", max_tokens=1)
    short_prompt = chat("hi", model="small", max_tokens=500)
    wins_long = Counter(ids(router.plan(long_prompt))[0] for _ in range(400))
    wins_short = Counter(ids(router.plan(short_prompt))[0] for _ in range(400))
    assert wins_long["lepton/cheap-in"] > 360  # prompt-heavy: the cheap input price wins
    assert wins_short["novita/cheap-out"] > 360  # completion-heavy: the cheap output wins


def test_same_seed_same_order_and_estimated_costs_match_prices() -> None:
    plans = [make_router(seed=7).plan(chat(max_tokens=50)) for _ in range(2)]
    assert ids(plans[0]) == ids(plans[1])
    routes = {r.id: r for r in real_catalog().models[WIZARD].routes}
    cost = plans[0].estimated_cost
    assert cost[OPENROUTER] < cost[LEPTON] < cost[NOVITA] < cost[DEEPINFRA]
    assert cost[DEEPINFRA] / cost[OPENROUTER] == pytest.approx(
        routes[DEEPINFRA].input_price / routes[OPENROUTER].input_price
    )


# -- health ----------------------------------------------------------------------------------------


def test_routes_with_recent_failures_go_last_least_failing_first() -> None:
    stats = FakeStats(
        {
            OPENROUTER: health(consecutive_failures=1),
            LEPTON: health(circuit_open=True, consecutive_failures=5),
        }
    )
    for seed in range(50):
        router = make_router(available={*HOSTED, "local"}, stats=stats, seed=seed)
        order = ids(router.plan(chat(max_tokens=10)))
        assert sorted(order[:2]) == sorted([NOVITA, DEEPINFRA])
        assert order[2:] == [OPENROUTER, LEPTON, LOCAL]  # local: last resort, after all


async def test_local_last_resort_is_last_unless_cheapest_with_sort_price() -> None:
    catalog = real_catalog()
    prices = PriceBook(catalog)
    router = make_router(catalog, available={*HOSTED, "local"}, prices=prices)
    for _ in range(30):
        assert ids(router.plan(chat(max_tokens=10)))[-1] == LOCAL
    assert ids(router.plan(chat(max_tokens=10, provider={"sort": "price"})))[-1] == LOCAL
    await prices.set(LOCAL, 0.01, 0.01)
    assert ids(router.plan(chat(max_tokens=10, provider={"sort": "price"})))[0] == LOCAL
    assert ids(router.plan(chat(max_tokens=10)))[-1] == LOCAL  # load balancing: still last


def test_local_at_capacity_is_skipped_with_the_reason() -> None:
    class Busy:
        def has_capacity(self) -> bool:
            return False

    class Idle:
        def has_capacity(self) -> bool:
            return True

    providers = {"lepton": Idle(), "local": Busy()}
    plan = make_router(available=available_from(providers)).plan(chat())
    assert ids(plan) == [LEPTON]
    assert plan.skipped[LOCAL] == "at capacity"
    assert "DEEPINFRA_API_KEY" in plan.skipped[DEEPINFRA]


# -- provider limits and parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "deepinfra_ok"),
    [
        ({"n": 2}, True),
        ({"n": 3}, False),
        ({"stop": [str(i) for i in range(16)]}, True),
        ({"stop": [str(i) for i in range(17)]}, False),
        ({"stop": "END"}, True),
    ],
)
def test_deepinfra_n_and_stop_limits(fields: dict[str, Any], deepinfra_ok: bool) -> None:
    plan = make_router().plan(chat(max_tokens=10, **fields))
    assert (DEEPINFRA in ids(plan)) is deepinfra_ok
    assert {LEPTON, NOVITA, OPENROUTER} <= set(ids(plan))
    if not deepinfra_ok:
        assert "deepinfra's limit" in plan.skipped[DEEPINFRA]


def test_unsupported_parameter_dropped_or_route_skipped_with_require_parameters() -> None:
    router = make_router(small_catalog())
    body = chat(model="small", max_tokens=10, logit_bias={"1": 5}, provider={"sort": "price"})
    plan = router.plan(body)
    assert "novita/org/small" in ids(plan)
    assert plan.dropped_params == {"novita/org/small": ("logit_bias",)}
    novita = next(r for r in plan.candidates if r.id == "novita/org/small")
    sent = plan.body_for(novita, body)
    assert "logit_bias" not in sent and "provider" not in sent and sent["max_tokens"] == 10
    lepton = next(r for r in plan.candidates if r.id == "lepton/small")
    assert plan.body_for(lepton, body)["logit_bias"] == {"1": 5}

    strict = {**body, "provider": {"require_parameters": True}}
    plan = router.plan(strict)
    assert "novita/org/small" not in ids(plan)
    assert "logit_bias" in plan.skipped["novita/org/small"]


# -- the provider object ---------------------------------------------------------------------------


def test_order_first_in_the_given_order_then_the_rest() -> None:
    for seed in range(20):
        body = chat(max_tokens=10, provider={"order": ["DeepInfra", "LEPTON"]})
        order = ids(make_router(seed=seed).plan(body))
        assert order[:2] == [DEEPINFRA, LEPTON]
        assert sorted(order[2:]) == sorted([NOVITA, OPENROUTER])


def test_allow_fallbacks_false() -> None:
    body = chat(provider={"order": ["novitaai", "deepinfra"], "allow_fallbacks": False})
    plan = make_router().plan(body)
    assert ids(plan) == [NOVITA, DEEPINFRA]
    assert "allow_fallbacks" in plan.skipped[LEPTON]
    plan = make_router().plan(chat(provider={"allow_fallbacks": False, "sort": "price"}))
    assert ids(plan) == [OPENROUTER]
    assert set(plan.skipped) == {LEPTON, NOVITA, DEEPINFRA, LOCAL}


def test_only_and_ignore() -> None:
    plan = make_router().plan(chat(provider={"only": ["Novita", "deep-infra"]}))
    assert sorted(ids(plan)) == sorted([NOVITA, DEEPINFRA])
    assert plan.skipped[LEPTON] == "not in provider.only"
    plan = make_router().plan(chat(provider={"ignore": ["openrouter", DEEPINFRA.upper()]}))
    assert sorted(ids(plan)) == sorted([LEPTON, NOVITA])
    assert plan.skipped[OPENROUTER] == plan.skipped[DEEPINFRA] == "ignored by provider.ignore"


def test_sort_by_price_throughput_latency() -> None:
    stats = FakeStats(
        {
            LEPTON: health(tokens_per_s=50, latency_p50_s=0.9),
            NOVITA: health(tokens_per_s=90, latency_p50_s=0.3),
            DEEPINFRA: health(tokens_per_s=70, latency_p50_s=0.5),
        }
    )
    for seed in range(10):
        router = make_router(stats=stats, seed=seed)
        assert ids(router.plan(chat(provider={"sort": "price"}))) == [
            OPENROUTER,
            LEPTON,
            NOVITA,
            DEEPINFRA,
        ]
        # no stats for openrouter: unknown goes last
        assert ids(router.plan(chat(provider={"sort": "throughput"}))) == [
            NOVITA,
            DEEPINFRA,
            LEPTON,
            OPENROUTER,
        ]
        assert ids(router.plan(chat(provider={"sort": "latency"}))) == [
            NOVITA,
            DEEPINFRA,
            LEPTON,
            OPENROUTER,
        ]


def test_max_price_skips_routes_above_it_with_the_reason() -> None:
    body = chat(provider={"max_price": {"prompt": 0.55, "completion": 0.55}, "sort": "price"})
    plan = make_router().plan(body)
    assert ids(plan) == [OPENROUTER, LEPTON]
    assert "0.62/0.62" in plan.skipped[NOVITA] and "max_price" in plan.skipped[NOVITA]
    body = chat(provider={"max_price": {"completion": 0.1}})
    with pytest.raises(NoEligibleRoute) as exc:
        make_router().plan(body)
    assert set(exc.value.skipped) >= set(HOSTED_WIZARD)


def test_ignored_fields_are_accepted() -> None:
    body = chat(provider={"data_collection": "deny", "quantizations": ["bf16"], "zdr": True})
    assert sorted(ids(make_router().plan(body))) == sorted(HOSTED_WIZARD)


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ("deepinfra", "provider"),
        ({"ordr": ["lepton"]}, "provider.ordr"),
        ({"order": "lepton"}, "provider.order"),
        ({"only": [1]}, "provider.only"),
        ({"sort": "fastest"}, "provider.sort"),
        ({"allow_fallbacks": "no"}, "provider.allow_fallbacks"),
        ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
        ({"max_price": 3}, "provider.max_price"),
    ],
)
def test_malformed_provider_object_is_a_400(provider: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        make_router().plan(chat(provider=provider))
    assert exc.value.status == 400 and exc.value.param == param


# -- models fallback list, errors ------------------------------------------------------------------


def test_models_fallback_list_in_order_after_the_primary() -> None:
    plan = make_router().plan(chat(models=["mistralai/Mixtral-8x22B-Instruct-v0.1", "wizardlm-2"]))
    assert plan.model.id == WIZARD
    assert sorted(ids(plan)[:4]) == sorted(HOSTED_WIZARD)
    assert ids(plan)[4:] == [OPENROUTER_MIXTRAL]
    only_list = {"messages": [{"role": "user", "content": "hi"}], "models": ["mixtral-8x22b"]}
    with pytest.raises(ModelNotFound):
        make_router().plan(only_list)
    only_list["models"] = ["mixtral-8x22b-instruct", WIZARD]
    plan = make_router().plan(only_list)
    assert plan.model.id == "mixtral-8x22b-instruct" and ids(plan)[0] == OPENROUTER_MIXTRAL


def test_unknown_model_and_bad_fields() -> None:
    with pytest.raises(ModelNotFound) as exc:
        make_router().plan(chat(model="gpt-4"))
    assert exc.value.status == 404
    with pytest.raises(ModelNotFound) as exc:
        make_router().plan(chat(models=["nope"]))
    assert exc.value.param == "models"
    for bad in ({"max_tokens": 0}, {"max_tokens": "10"}, {"models": "x"}):
        with pytest.raises(InvalidRequest):
            make_router().plan(chat(**bad))


def test_no_eligible_route_lists_every_reason() -> None:
    with pytest.raises(NoEligibleRoute) as exc:
        make_router(available=set()).plan(chat())
    assert exc.value.status == 503
    assert set(exc.value.skipped) == {*HOSTED_WIZARD, LOCAL}
    assert "LEPTON_API_KEY" in exc.value.skipped[LEPTON]
    assert "LEPTON_API_KEY" in exc.value.body()["error"]["message"]


# -- price overrides and rank() --------------------------------------------------------------------


async def test_price_override_changes_the_order() -> None:
    catalog = real_catalog()
    prices = PriceBook(catalog)
    router = make_router(catalog, prices=prices, seed=5)
    assert ids(router.plan(chat(provider={"sort": "price"})))[-1] == DEEPINFRA
    await prices.set(DEEPINFRA, 0.05, 0.05)
    assert ids(router.plan(chat(provider={"sort": "price"})))[0] == DEEPINFRA
    firsts = Counter(ids(router.plan(chat()))[0] for _ in range(500))
    assert firsts[DEEPINFRA] > 480  # weight (0.48/0.05)² ≈ 92x the next
    plan = router.plan(chat(provider={"max_price": {"prompt": 0.1}}))
    assert ids(plan) == [DEEPINFRA]
    await prices.clear(DEEPINFRA)
    assert ids(router.plan(chat(provider={"sort": "price"})))[-1] == DEEPINFRA


def test_rank_uses_catalog_cost_and_matches_plan_with_sort_price() -> None:
    catalog = real_catalog()
    router = make_router(catalog)
    ranked = router.rank("WizardLM-2", 1000, 100)
    routes = {r.id: r for r in catalog.models[WIZARD].routes}
    assert [e.cost for e in ranked] == sorted(routes[e.route.id].cost(1000, 100) for e in ranked)
    for e in ranked:
        assert e.cost == pytest.approx(routes[e.route.id].cost(1000, 100))
    assert [e.route.id for e in ranked if e.unavailable is None] == ids(
        router.plan(chat(max_tokens=100, provider={"sort": "price"}))
    )
    assert not router.rank(WIZARD, 65_500, 100)[0].fits
