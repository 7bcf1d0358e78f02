"""Prometheus exposition: what the stores' records become in /metrics, per app registry."""

from __future__ import annotations

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from gateway.stats import (
    Attempt,
    MemoryStats,
    RedisStats,
    StatsMetrics,
    StatsOptions,
    Usage,
    make_stats,
    render_metrics,
)
from gateway.stats.metrics import outcome_label

from .helpers import FakeClock, free_port


def samples(metrics: StatsMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = render_metrics(metrics)
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_records_become_counters_histograms_and_gauges(clock: FakeClock) -> None:
    metrics = StatsMetrics()
    store = make_stats(None, metrics=metrics, clock=clock, failure_threshold=2)
    route = "deepinfra/microsoft/WizardLM-2-8x22B"
    for latency in (0.3, 0.7, 4.0):
        store.record_attempt(Attempt(route, ok=True, latency_s=latency, ttft_s=0.2))
    for _ in range(2):
        store.record_attempt(Attempt(route, ok=False, latency_s=30.0, error_kind="http_503"))
    store.record_usage(Usage(route, "wizardlm-2-8x22b", "k", 1000, 200, 0.0006))
    store.record_usage(Usage(route, "wizardlm-2-8x22b", "k", 500, 100, 0.0003))
    metrics.observe_failed_request("wizardlm-2-8x22b", "all_routes_failed")
    got = samples(metrics)
    r = (("route", route),)
    rm = (("model", "wizardlm-2-8x22b"), ("route", route))
    assert got[("moegw_attempts_total", (("outcome", "ok"), *r))] == 3
    assert got[("moegw_attempts_total", (("outcome", "http_503"), *r))] == 2
    assert (
        got[("moegw_requests_total", (("model", "wizardlm-2-8x22b"), ("outcome", "ok"), *r))] == 2
    )
    failed = (("model", "wizardlm-2-8x22b"), ("outcome", "all_routes_failed"), ("route", "none"))
    assert got[("moegw_requests_total", failed)] == 1
    assert got[("moegw_prompt_tokens_total", rm)] == 1500
    assert got[("moegw_completion_tokens_total", rm)] == 300
    assert abs(got[("moegw_cost_usd_total", rm)] - 0.0009) < 1e-12
    assert got[("moegw_attempt_latency_seconds_count", r)] == 5
    assert got[("moegw_attempt_latency_seconds_bucket", (("le", "1.0"), *r))] == 2
    assert got[("moegw_attempt_latency_seconds_bucket", (("le", "5.0"), *r))] == 3
    assert got[("moegw_attempt_ttft_seconds_count", r)] == 3
    assert got[("moegw_stats_connected", ())] == 1  # memory is always "connected"
    assert got[("moegw_stats_pending_records", ())] == 0
    assert got[("moegw_route_circuit_open", r)] == 1  # two failures in a row, threshold 2
    assert got[("moegw_route_consecutive_failures", r)] == 2
    assert got[("moegw_route_uptime", (*r, ("window", "5m")))] == 0.6


def test_each_app_has_its_own_registry_not_the_global_one(clock: FakeClock) -> None:
    first, second = StatsMetrics(), StatsMetrics()
    MemoryStats(metrics=first, clock=clock).record_attempt(Attempt("r/a", ok=True, latency_s=1))
    key = ("moegw_attempts_total", (("outcome", "ok"), ("route", "r/a")))
    assert samples(first)[key] == 1
    assert key not in samples(second)
    assert b"moegw_attempts" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


async def test_redis_store_reports_pending_and_disconnection(clock: FakeClock) -> None:
    metrics = StatsMetrics()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisStats(
        nowhere,
        StatsOptions(socket_timeout_s=0.5, close_timeout_s=0.3),
        metrics=metrics,
        clock=clock,
    )
    for i in range(7):
        store.record_attempt(Attempt("r/x", ok=True, latency_s=0.5 + i))
    store.record_usage(Usage("r/x", "m", "k", 1, 1, 0.001))
    await store.flush()
    got = samples(metrics)
    assert got[("moegw_stats_connected", ())] == 0
    assert got[("moegw_stats_pending_records", ())] == 8
    assert got[("moegw_stats_pending_entries", ())] > 0
    assert got[("moegw_stats_flushes_total", (("result", "error"),))] >= 1
    assert got[("moegw_route_uptime", (("route", "r/x"), ("window", "5m")))] == 1.0
    await store.aclose()


def test_outcome_labels_stay_bounded() -> None:
    assert outcome_label(True, "ignored") == "ok"
    assert outcome_label(False, None) == "error"
    assert outcome_label(False, 'x"y\n' + "z" * 100) == "x_y_" + "z" * 28
