"""The behaviour both stores share, run against each (`make_store` is parametrized over the
in-memory store and the Redis store on a real Redis): window math, sliding windows, usage
totals, the circuit, and bad input. A Redis store is flushed and refreshed (`settle`) before
reads that must come from Redis; the memory store has nothing to settle."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gateway.stats import Attempt, MemoryStats, RedisStats, Usage, UsageTotals, make_stats
from gateway.stats.usage import utc_day
from gateway.stats.windows import ALPHA

from .conftest import StoreFactory
from .helpers import T0, FakeClock, settle


def close_to(estimate: float | None, exact: float) -> bool:
    return estimate is not None and abs(estimate - exact) <= ALPHA * exact * (1 + 1e-9)


async def test_window_stats_match_numpy_on_known_samples(make_store: StoreFactory) -> None:
    store = make_store()
    rng = np.random.default_rng(7)
    latency = rng.lognormal(0.5, 0.6, size=400)
    ttft = latency * rng.uniform(0.1, 0.5, size=400)
    ok = rng.uniform(size=400) > 0.13
    tokens = rng.integers(20, 400, size=400)
    for i in range(400):
        store.record_attempt(
            Attempt(
                "deepinfra/x",
                ok=bool(ok[i]),
                latency_s=float(latency[i]),
                ttft_s=float(ttft[i]),
                completion_tokens=int(tokens[i]),
                at=T0 - i * 0.5,  # all within the current and previous minutes
            )
        )
    await settle(store)
    stats = store.route_health("deepinfra/x").windows["5m"]
    assert stats.requests == 400 and stats.failures == int((~ok).sum())
    assert stats.uptime == pytest.approx(ok.mean())
    for estimate, samples, q in [
        (stats.latency_p50_s, latency, 50),
        (stats.latency_p99_s, latency, 99),
        (stats.ttft_p50_s, ttft, 50),
        (stats.ttft_p99_s, ttft, 99),
    ]:
        assert close_to(estimate, float(np.percentile(samples, q, method="inverted_cdf")))
    rates = (tokens[ok] - 1) / (latency[ok] - ttft[ok])
    assert close_to(stats.tokens_per_s, float(np.percentile(rates, 50, method="inverted_cdf")))
    assert store.route_health("deepinfra/x").windows["1d"] == stats  # same samples, same answer


async def test_windows_slide_with_time(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store()
    route = "lepton/wizardlm-2-8x22b"
    for age_s, ok, count in [
        (0, True, 3),
        (10 * 60, False, 2),
        (2 * 3600, True, 5),
        (2 * 86400, True, 4),
    ]:
        for _ in range(count):
            store.record_attempt(Attempt(route, ok=ok, latency_s=1.0, at=T0 - age_s))
    await settle(store)
    windows = store.route_health(route).windows
    assert (windows["5m"].requests, windows["30m"].requests, windows["1d"].requests) == (3, 5, 10)
    assert windows["30m"].uptime == pytest.approx(3 / 5)
    clock.advance(5 * 60)  # the newest records leave the 5m window
    await store.refresh()
    windows = store.route_health(route).windows
    assert windows["5m"].requests == 0 and windows["5m"].uptime is None
    assert windows["30m"].requests == 5


async def test_own_records_show_in_health_before_any_flush(make_store: StoreFactory) -> None:
    store = make_store()
    await store.start()
    assert store.route_health("novita/m").windows["5m"].requests == 0
    store.record_attempt(Attempt("novita/m", ok=False, latency_s=0.3, error_kind="http_500"))
    health = store.route_health("novita/m")
    assert health.windows["5m"].requests == 1 and health.windows["5m"].uptime == 0.0
    assert health.consecutive_failures == 1 and health.recently_failed


async def test_usage_totals_are_the_sums_of_recorded_usage(make_store: StoreFactory) -> None:
    store = make_store()
    rnd = random.Random(11)
    routes, models, clients = ["a/x", "b/x", "c/y"], ["wizard", "mixtral"], ["k1", "k2", "k3"]
    days = [T0, T0 - 86_400]
    expected: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(300):
        usage = Usage(
            route_id=rnd.choice(routes),
            model=rnd.choice(models),
            client_key=rnd.choice(clients),
            prompt_tokens=rnd.randint(1, 5000),
            completion_tokens=rnd.randint(0, 900),
            cost_usd=rnd.randint(1, 10**6) * 1e-9,
            at=rnd.choice(days),
        )
        store.record_usage(usage)
        day = utc_day(usage.at or 0)
        for by, name in (
            ("route", usage.route_id),
            ("model", usage.model),
            ("client", usage.client_key),
        ):
            sums = expected.setdefault((day, by, name), [0, 0, 0, 0.0])
            sums[0] += 1
            sums[1] += usage.prompt_tokens
            sums[2] += usage.completion_tokens
            sums[3] += usage.cost_usd
    await settle(store)
    for day in (utc_day(T0), utc_day(T0 - 86_400)):
        for by in ("route", "model", "client"):
            totals = await store.usage(by=by, day=day)
            want = {name: v for (d, b, name), v in expected.items() if d == day and b == by}
            assert set(totals) == set(want)
            for name, t in totals.items():
                requests, prompt, completion, cost = want[name]
                assert (t.requests, t.prompt_tokens, t.completion_tokens) == (
                    requests,
                    prompt,
                    completion,
                )
                assert t.cost_usd == pytest.approx(cost, rel=0, abs=1e-9)
    today = await store.usage(by="model")  # default day: the clock's UTC day
    assert today == await store.usage(by="model", day=utc_day(T0))


async def test_circuit_opens_cools_down_half_opens_and_closes(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(failure_threshold=3, cooldown_s=10)
    route = "openrouter/m"
    for _ in range(2):
        store.record_attempt(Attempt(route, ok=False, latency_s=1, error_kind="timeout"))
    await settle(store)
    health = store.route_health(route)
    assert (health.consecutive_failures, health.circuit) == (2, "closed")
    store.record_attempt(Attempt(route, ok=False, latency_s=1, error_kind="timeout"))
    await settle(store)
    health = store.route_health(route)
    assert health.circuit_open and health.circuit == "open"
    clock.advance(11)
    health = store.route_health(route)
    assert not health.circuit_open and health.circuit == "half_open"
    store.record_attempt(Attempt(route, ok=False, latency_s=1, error_kind="timeout"))
    assert store.route_health(route).circuit == "open"  # a failed probe reopens at once
    clock.advance(11)
    store.record_attempt(Attempt(route, ok=True, latency_s=1))
    await settle(store)
    health = store.route_health(route)
    assert health.circuit == "closed" and health.consecutive_failures == 0
    assert health.last_failure_at == pytest.approx(T0 + 11)


async def test_bad_records_are_counted_never_raised(make_store: StoreFactory) -> None:
    store = make_store()
    registry = store.metrics.registry
    store.record_attempt(Attempt("", ok=True, latency_s=1.0))
    store.record_attempt(Attempt(None, ok=True, latency_s=1.0))  # type: ignore[arg-type]
    store.record_attempt(Attempt("r/ok", ok=True, latency_s=1.0, at=float("inf")))
    store.record_usage(Usage("", "m", "k", 1, 1, 0.1))
    assert registry.get_sample_value("moegw_stats_record_errors_total") == 4
    # odd but recordable values are kept with what can be trusted
    store.record_attempt(Attempt("r/ok", ok=True, latency_s=float("nan"), ttft_s=-1.0))
    store.record_usage(Usage("r/ok", "m", "k", -5, 7, float("nan")))
    await settle(store)
    assert store.route_health("r/ok").windows["5m"].requests == 1
    assert store.route_health("r/ok").windows["5m"].latency_p50_s is None
    totals = (await store.usage(by="route"))["r/ok"]
    assert totals == UsageTotals(requests=1, prompt_tokens=0, completion_tokens=7, cost_usd=0.0)


async def test_usage_query_is_validated(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="grouped by"):
        await store.usage(by="provider")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        await store.usage(by="route", day="yesterday")


async def test_unknown_route_has_empty_windows(make_store: StoreFactory) -> None:
    store = make_store()
    health = store.route_health("nobody/never")
    assert set(health.windows) == {"5m", "30m", "1d"}
    assert all(w.requests == 0 and w.uptime is None for w in health.windows.values())
    assert health.circuit == "closed" and not health.recently_failed


async def test_make_stats_picks_the_store_and_checks_options() -> None:
    memory = make_stats(None, prefix="p:", flush_interval_s=0.5, max_pending=10)
    assert isinstance(memory, MemoryStats) and memory.options.max_pending == 10
    shared = make_stats("redis://127.0.0.1:6379/13", prefix="unused-never-written:")
    assert isinstance(shared, RedisStats)
    await shared.aclose()
    with pytest.raises(TypeError, match="flush_every"):
        make_stats(None, flush_every=1)
    with pytest.raises(ValueError, match="failure_threshold"):
        make_stats(None, failure_threshold=0)
