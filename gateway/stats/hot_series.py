"""The per-request Prometheus series, accumulated in plain dicts and exposed at scrape time.

    series = HotSeries(latency_buckets, ttft_buckets)
    registry.register(series)                  # scraped like any collector
    series.attempt(route, outcome, latency_s, ttft_s)
    series.request(route, model, outcome); series.usage(route, model, prompt, completion, cost)

prometheus_client's counter and histogram children take a lock and go through a few layers per
increment: the seven of a served request (attempt, latency, TTFT, request, tokens, cost) cost
~25% of the stats writes, themselves ~10% of a request's CPU. Here each record is a dict lookup
and a few additions into per-series accumulators (the event loop's thread is the only writer);
a scrape reads them into metric families, the same names, labels and buckets as before. Label
sets are bounded by the callers (route ids from the catalog, outcome kinds cut by
`outcome_label`); `MAX_SERIES` guards against a runaway caller all the same.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

MAX_SERIES = 16_384  # per family; past it new label sets are not recorded


class _Histogram:
    """One label set's histogram: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int):
        self.counts = [0] * size
        self.total = 0.0


class HotSeries(Collector):
    def __init__(self, latency_buckets: tuple[float, ...], ttft_buckets: tuple[float, ...]):
        self.latency_buckets = tuple(float(b) for b in latency_buckets)
        self.ttft_buckets = tuple(float(b) for b in ttft_buckets)
        self.attempts: dict[tuple[str, str], int] = {}
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str], list[float]] = {}  # [prompt, completion, cost USD]
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}

    # -- writes: the request path ----------------------------------------------------------------

    def attempt(self, route: str, outcome: str, latency_s: float, ttft_s: float | None) -> None:
        key = (route, outcome)
        count = self.attempts.get(key)
        if count is not None:
            self.attempts[key] = count + 1
        elif len(self.attempts) < MAX_SERIES:
            self.attempts[key] = 1
        if math.isfinite(latency_s) and latency_s >= 0:
            _observe(self.latency, route, self.latency_buckets, latency_s)
        if ttft_s is not None and math.isfinite(ttft_s) and ttft_s >= 0:
            _observe(self.ttft, route, self.ttft_buckets, ttft_s)

    def request(self, route: str, model: str, outcome: str) -> None:
        key = (route, model, outcome)
        count = self.requests.get(key)
        if count is not None:
            self.requests[key] = count + 1
        elif len(self.requests) < MAX_SERIES:
            self.requests[key] = 1

    def usage(self, route: str, model: str, prompt: int, completion: int, cost: float) -> None:
        key = (route, model)
        sums = self.tokens.get(key)
        if sums is None:
            if len(self.tokens) >= MAX_SERIES:
                return
            sums = self.tokens[key] = [0, 0, 0.0]
        sums[0] += max(0, prompt)
        sums[1] += max(0, completion)
        if math.isfinite(cost) and cost > 0:
            sums[2] += cost

    # -- reads: a scrape -------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # no names claimed at registration: collect() is only called on a scrape

    def collect(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "moegw_attempts", "Upstream attempts by route and outcome", labels=["route", "outcome"]
        )
        for (route, outcome), count in list(self.attempts.items()):
            attempts.add_metric([route, outcome], count)
        yield attempts
        requests = CounterMetricFamily(
            "moegw_requests",
            "Requests by serving route, model and outcome",
            labels=["route", "model", "outcome"],
        )
        for labels, count in list(self.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        by = ["route", "model"]
        prompt = CounterMetricFamily("moegw_prompt_tokens", "Prompt tokens served", labels=by)
        completion = CounterMetricFamily(
            "moegw_completion_tokens", "Completion tokens served", labels=by
        )
        cost = CounterMetricFamily("moegw_cost_usd", "Cost of served requests", labels=by)
        for (route, model), sums in list(self.tokens.items()):
            prompt.add_metric([route, model], sums[0])
            completion.add_metric([route, model], sums[1])
            cost.add_metric([route, model], sums[2])
        yield prompt
        yield completion
        yield cost
        yield _histogram_family(
            "moegw_attempt_latency_seconds",
            "Attempt latency, start to last byte",
            self.latency,
            self.latency_buckets,
        )
        yield _histogram_family(
            "moegw_attempt_ttft_seconds",
            "Attempt time to first token",
            self.ttft,
            self.ttft_buckets,
        )


def _observe(
    table: dict[str, _Histogram], route: str, buckets: tuple[float, ...], value: float
) -> None:
    histogram = table.get(route)
    if histogram is None:
        if len(table) >= MAX_SERIES:
            return
        histogram = table[route] = _Histogram(len(buckets) + 1)
    histogram.counts[bisect.bisect_left(buckets, value)] += 1  # le: value <= bound
    histogram.total += value


def _histogram_family(
    name: str, documentation: str, table: dict[str, _Histogram], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["route"])
    labels = [floatToGoString(b) for b in bounds] + ["+Inf"]
    for route, histogram in list(table.items()):
        running, cumulative = 0, []
        for label, count in zip(labels, list(histogram.counts), strict=True):
            running += count
            cumulative.append((label, running))
        family.add_metric([route], cumulative, sum_value=histogram.total)
    return family
