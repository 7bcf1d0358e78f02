"""Window math without a store: histogram accuracy against numpy, bucket coverage, encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.stats.base import Attempt
from gateway.stats.circuit import CircuitDelta, CircuitState
from gateway.stats.windows import (
    ALPHA,
    COARSE_S,
    FINE_S,
    HOUR_S,
    MAX_VALUE,
    MIN_VALUE,
    Bucket,
    RouteWindows,
    bin_of,
    bin_value,
    in_window,
    percentile,
    throughput,
)

from .helpers import T0


def histogram_of(samples: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for value in samples:
        out[bin_of(float(value))] = out.get(bin_of(float(value)), 0) + 1
    return out


@pytest.mark.parametrize(
    "samples",
    [
        np.random.default_rng(1).lognormal(mean=0.0, sigma=1.0, size=5000),  # latencies ~1 s
        np.random.default_rng(2).uniform(0.05, 3.0, size=1234),
        np.random.default_rng(3).exponential(40.0, size=777) + 1.0,  # tokens/s
        np.array([0.25] * 99 + [30.0]),  # a heavy tail: p99 must not see the outlier
    ],
)
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_percentile_within_alpha_of_numpy(samples: np.ndarray, q: float) -> None:
    estimate = percentile(histogram_of(samples), q)
    exact = float(np.percentile(samples, q * 100, method="inverted_cdf"))
    assert estimate is not None
    assert abs(estimate - exact) <= ALPHA * exact * (1 + 1e-9)


def test_every_value_in_range_is_reported_within_alpha() -> None:
    values = np.geomspace(MIN_VALUE * 1.0001, MAX_VALUE * 0.9999, 20_000)
    reported = np.array([bin_value(bin_of(float(v))) for v in values])
    assert np.max(np.abs(reported - values) / values) <= ALPHA * (1 + 1e-9)
    # out of range is clamped, not an error
    assert bin_value(bin_of(0.0)) == pytest.approx(bin_value(bin_of(MIN_VALUE)))
    assert bin_value(bin_of(float("nan"))) == pytest.approx(bin_value(bin_of(MIN_VALUE)))
    assert bin_value(bin_of(1e12)) == pytest.approx(bin_value(bin_of(MAX_VALUE)))


def test_percentile_of_empty_histogram_is_none() -> None:
    assert percentile({}, 0.5) is None


def test_bucket_round_trips_through_redis_fields_and_subtracts() -> None:
    bucket = Bucket()
    for i in range(50):
        bucket.add_attempt(
            Attempt("r", ok=i % 5 != 0, latency_s=0.1 * (i + 1), ttft_s=0.05, completion_tokens=9)
        )
    fields = bucket.to_fields()
    assert fields["n"] == 50 and fields["f"] == 10
    again = Bucket.from_fields({k: str(v) for k, v in fields.items()})
    assert again == bucket
    again.merge(bucket, -1)
    assert again.attempts == 0 and again.entries == 2  # histograms emptied, not left at zero


def test_throughput_uses_decode_time_when_ttft_leaves_some() -> None:
    streamed = Attempt("r", ok=True, latency_s=3.0, ttft_s=1.0, completion_tokens=101)
    assert throughput(streamed) == pytest.approx(100 / 2.0)
    whole_body = Attempt("r", ok=True, latency_s=2.0, ttft_s=2.0, completion_tokens=50)
    assert throughput(whole_body) == pytest.approx(25.0)
    assert throughput(Attempt("r", ok=False, latency_s=2.0, completion_tokens=50)) is None
    assert throughput(Attempt("r", ok=True, latency_s=2.0, completion_tokens=0)) is None


def test_windows_cover_the_current_bucket_and_the_ones_before() -> None:
    minute = T0 - T0 % FINE_S
    assert in_window((FINE_S, int(minute)), "5m", T0)
    assert in_window((FINE_S, int(minute - 4 * FINE_S)), "5m", T0)
    assert not in_window((FINE_S, int(minute - 5 * FINE_S)), "5m", T0)
    assert in_window((FINE_S, int(minute - 29 * FINE_S)), "30m", T0)
    assert not in_window((FINE_S, int(minute - 30 * FINE_S)), "30m", T0)
    quarter = T0 - T0 % COARSE_S
    assert in_window((COARSE_S, int(quarter - 95 * COARSE_S)), "1d", T0)
    assert not in_window((COARSE_S, int(quarter - 96 * COARSE_S)), "1d", T0)
    assert not in_window((COARSE_S, int(quarter)), "5m", T0)  # wrong bucket length


def test_route_windows_sums_follow_adds_replaces_and_time() -> None:
    windows = RouteWindows()
    windows.add_attempt(Attempt("r", ok=True, latency_s=1.0), T0)
    windows.add_attempt(Attempt("r", ok=False, latency_s=1.0), T0 - 600)  # 10 minutes ago
    assert windows.window("5m", T0).attempts == 1
    assert windows.window("30m", T0).attempts == 2
    assert windows.window("1d", T0).failures == 1
    # a later add to a bucket already summed shows up without a rebuild
    windows.add_attempt(Attempt("r", ok=False, latency_s=1.0), T0 - 60)
    assert windows.window("5m", T0).failures == 1
    # replacing a bucket (what a refresh does) swaps its contribution
    key = (FINE_S, int(T0 - T0 % FINE_S))
    windows.replace(key, Bucket(attempts=7, failures=7))
    assert windows.window("5m", T0).attempts == 8
    # 26 minutes later the 5m window is empty, the 30m one holds only the newest minutes
    later = T0 + 26 * 60
    assert windows.window("5m", later).attempts == 0
    assert windows.window("30m", later).attempts == 8
    # the hour buckets (the dashboard's 7d series) outlive the day: pruned after 7 days
    windows.prune(T0 + 2 * 86_400)
    assert {key[0] for key in windows.buckets} == {HOUR_S}
    windows.prune(T0 + 8 * 86_400)
    assert windows.buckets == {}


def test_circuit_deltas_compose_like_the_outcomes_they_summarise() -> None:
    outcomes = [False, False, True, False, False, False, True, False, False]
    one_by_one = CircuitState()
    for i, ok in enumerate(outcomes):
        one_by_one = one_by_one.apply(CircuitDelta.of(ok, float(i)))
    for split in range(len(outcomes) + 1):
        left, right = CircuitDelta(), CircuitDelta()
        for i, ok in enumerate(outcomes[:split]):
            left = left.then(CircuitDelta.of(ok, float(i)))
        for i, ok in enumerate(outcomes[split:], start=split):
            right = right.then(CircuitDelta.of(ok, float(i)))
        start = CircuitState(consecutive_failures=4, last_failure_at=-1.0)
        assert start.apply(left).apply(right) == start.apply(left.then(right))
    assert one_by_one == CircuitState(consecutive_failures=2, last_failure_at=8.0)
    assert math.isclose(one_by_one.last_failure_at or 0, 8.0)
