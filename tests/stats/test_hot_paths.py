"""The stats writes' fast paths answer exactly as the general code does."""

from __future__ import annotations

import calendar
import math
import time

import pytest

from gateway.stats import StatsMetrics
from gateway.stats.base import Attempt, Usage
from gateway.stats.usage import (
    MAX_COST_USD_PER_RECORD,
    MAX_TOKENS_PER_RECORD,
    clamp_usage,
    utc_day,
)


def test_utc_day_is_right_on_both_sides_of_midnight_in_any_order() -> None:
    midnight = calendar.timegm((2026, 11, 28, 0, 0, 0))
    for at in (midnight - 0.001, midnight, midnight - 86_400.5, midnight + 86_399.9, midnight):
        assert utc_day(at) == time.strftime("%Y-%m-%d", time.gmtime(at))
    assert utc_day(midnight - 0.001) == "2026-11-27" and utc_day(midnight) == "2026-11-28"


@pytest.mark.parametrize(
    ("prompt", "completion", "cost", "sane"),
    [
        (10, 4, 1e-6, True),
        (0, 0, 0.0, True),
        (MAX_TOKENS_PER_RECORD, MAX_TOKENS_PER_RECORD, MAX_COST_USD_PER_RECORD, True),
        (10.0, 4, 1e-6, True),  # a float count that is a whole number: kept as it is
        (10, 4, 0, True),  # an int cost
        (MAX_TOKENS_PER_RECORD + 1, 4, 1e-6, False),
        (-1, 4, 1e-6, False),
        (True, 4, 1e-6, False),
        (10, 4, math.nan, False),
        (10, 4, math.inf, False),
        (10, 4, -0.5, False),
        (10, 4, MAX_COST_USD_PER_RECORD * 2, False),
    ],
)
def test_clamp_fast_path_agrees_with_the_general_rules(
    prompt: object, completion: object, cost: object, sane: bool
) -> None:
    usage = Usage("r/a", "m", "k", prompt, completion, cost)  # type: ignore[arg-type]
    clamped, changed = clamp_usage(usage)
    assert (changed == ()) == sane and (clamped is usage) == sane
    assert 0 <= clamped.prompt_tokens <= MAX_TOKENS_PER_RECORD
    assert 0 <= clamped.cost_usd <= MAX_COST_USD_PER_RECORD


def test_histogram_bounds_are_inclusive_and_series_sum() -> None:
    metrics = StatsMetrics()
    for latency in (0.1, 0.1000001, 600.0, 601.0, math.nan):
        metrics.observe_attempt(Attempt("r/a", ok=True, latency_s=latency))
    get = metrics.registry.get_sample_value
    labels = {"route": "r/a"}
    assert get("moegw_attempt_latency_seconds_bucket", {**labels, "le": "0.1"}) == 1
    assert get("moegw_attempt_latency_seconds_bucket", {**labels, "le": "0.25"}) == 2
    assert get("moegw_attempt_latency_seconds_bucket", {**labels, "le": "600.0"}) == 3
    assert get("moegw_attempt_latency_seconds_bucket", {**labels, "le": "+Inf"}) == 4
    assert get("moegw_attempt_latency_seconds_count", labels) == 4  # NaN is not a latency
    assert get("moegw_attempt_latency_seconds_sum", labels) == pytest.approx(1201.2000001)
    assert get("moegw_attempts_total", {**labels, "outcome": "ok"}) == 5
