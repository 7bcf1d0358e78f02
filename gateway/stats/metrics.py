"""Prometheus exposition for the stats side channel, in a registry of its own per app.

    metrics = StatsMetrics()                     # one per app: never the global registry
    stats = make_stats(settings.redis_url, metrics=metrics)
    body, content_type = render_metrics(metrics)  # the /metrics handler

Counters and histograms count what *this process* recorded (Prometheus sums replicas); the
gauges read the store at scrape time: pending records and buffered entries, whether the shared
store is reachable, and each known route's circuit and 5m/30m/1d uptime.

Series (all prefixed moegw_):
    attempts_total{route,outcome}            one per upstream attempt; outcome "ok" or its kind
    requests_total{route,model,outcome}      served ("ok", from record_usage) or failed
                                             (observe_failed_request, the dispatcher's final error)
    prompt_tokens_total / completion_tokens_total / cost_usd_total{route,model}
    attempt_latency_seconds / attempt_ttft_seconds{route}        histograms
    stats_pending_records, stats_pending_entries, stats_connected   gauges
    stats_flushes_total{result}, stats_dropped_samples_total, stats_record_errors_total
    stats_usage_clamped_total{route,field}   implausible usage values clamped (usage.py)
    stats_batch_increments_dropped_total     increments a Redis counter could not take
    route_circuit_open{route}, route_consecutive_failures{route}, route_uptime{route,window}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.stats.base import Attempt, RouteHealth, Usage

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
MAX_CACHED_CHILDREN = 4096


def outcome_label(ok: bool, kind: str | None) -> str:
    """A bounded label value: "ok", or the error kind cut to 32 safe characters."""
    if ok:
        return "ok"
    return _LABEL_UNSAFE.sub("_", kind or "error")[:32] or "error"


class StatsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "moegw_attempts",
            "Upstream attempts by route and outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.requests = Counter(
            "moegw_requests",
            "Requests by serving route, model and outcome",
            ["route", "model", "outcome"],
            registry=r,
        )
        by_route_model = ["route", "model"]
        self.prompt_tokens = Counter(
            "moegw_prompt_tokens", "Prompt tokens served", by_route_model, registry=r
        )
        self.completion_tokens = Counter(
            "moegw_completion_tokens", "Completion tokens served", by_route_model, registry=r
        )
        self.cost = Counter("moegw_cost_usd", "Cost of served requests", by_route_model, registry=r)
        self.latency = Histogram(
            "moegw_attempt_latency_seconds",
            "Attempt latency, start to last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "moegw_attempt_ttft_seconds",
            "Attempt time to first token",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.flushes = Counter(
            "moegw_stats_flushes", "Stats flushes to the shared store", ["result"], registry=r
        )
        self.dropped_samples = Counter(
            "moegw_stats_dropped_samples",
            "Latency/TTFT samples shed because the pending buffer was full (counts kept)",
            registry=r,
        )
        self.record_errors = Counter(
            "moegw_stats_record_errors", "record_* calls that could not be recorded", registry=r
        )
        self.usage_clamped = Counter(
            "moegw_stats_usage_clamped",
            "Implausible usage values (huge, negative, NaN) clamped before recording",
            ["route", "field"],
            registry=r,
        )
        self.batch_increments_dropped = Counter(
            "moegw_stats_batch_increments_dropped",
            "Increments left out of a batch because Redis's counter would overflow",
            registry=r,
        )
        self._source = _StoreCollector()
        r.register(self._source)
        # labels() costs a few µs a call; the children of the hot path are looked up once
        self._attempt_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._usage_children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    def observe_attempt(self, attempt: Attempt) -> None:
        route = attempt.route_id
        key = (route, outcome_label(attempt.ok, attempt.error_kind))
        children = self._attempt_children.get(key)
        if children is None:
            children = (
                self.attempts.labels(*key),
                self.latency.labels(route),
                self.ttft.labels(route),
            )
            if len(self._attempt_children) < MAX_CACHED_CHILDREN:
                self._attempt_children[key] = children
        attempts, latency, ttft = children
        attempts.inc()
        if math.isfinite(attempt.latency_s) and attempt.latency_s >= 0:
            latency.observe(attempt.latency_s)
        if attempt.ttft_s is not None and math.isfinite(attempt.ttft_s) and attempt.ttft_s >= 0:
            ttft.observe(attempt.ttft_s)

    def observe_usage(self, usage: Usage) -> None:
        key = (usage.route_id, usage.model)
        children = self._usage_children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key, "ok"),
                self.prompt_tokens.labels(*key),
                self.completion_tokens.labels(*key),
                self.cost.labels(*key),
            )
            if len(self._usage_children) < MAX_CACHED_CHILDREN:
                self._usage_children[key] = children
        requests, prompt, completion, cost = children
        requests.inc()
        prompt.inc(max(0, usage.prompt_tokens))
        completion.inc(max(0, usage.completion_tokens))
        if math.isfinite(usage.cost_usd) and usage.cost_usd > 0:
            cost.inc(usage.cost_usd)

    def observe_failed_request(self, model: str, outcome: str, route_id: str | None = None) -> None:
        """The dispatcher's final failure of a whole request (served ones come from usage)."""
        self.requests.labels(route_id or "none", model, outcome_label(False, outcome)).inc()

    def bind_store(
        self,
        *,
        pending: Callable[[], int],
        pending_entries: Callable[[], int],
        connected: Callable[[], bool],
        health: Callable[[], Iterable[RouteHealth]],
    ) -> None:
        """Called by the store that reports here; the last store bound wins."""
        self._source.bind(pending, pending_entries, connected, health)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def render_metrics(metrics: StatsMetrics) -> tuple[bytes, str]:
    """The /metrics body and its content type."""
    return metrics.render()


class _StoreCollector(Collector):
    def __init__(self) -> None:
        self._pending: Callable[[], int] = lambda: 0
        self._entries: Callable[[], int] = lambda: 0
        self._connected: Callable[[], bool] = lambda: False
        self._health: Callable[[], Iterable[RouteHealth]] = list

    def bind(
        self,
        pending: Callable[[], int],
        entries: Callable[[], int],
        connected: Callable[[], bool],
        health: Callable[[], Iterable[RouteHealth]],
    ) -> None:
        self._pending, self._entries, self._connected, self._health = (
            pending,
            entries,
            connected,
            health,
        )

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "moegw_stats_pending_records", "Records not yet persisted", value=self._pending()
        )
        yield GaugeMetricFamily(
            "moegw_stats_pending_entries", "Buffered delta entries (bounded)", value=self._entries()
        )
        yield GaugeMetricFamily(
            "moegw_stats_connected",
            "1 when the shared stats store answered the last flush",
            value=1.0 if self._connected() else 0.0,
        )
        circuit = GaugeMetricFamily(
            "moegw_route_circuit_open", "1 while a route's circuit is open", labels=["route"]
        )
        failures = GaugeMetricFamily(
            "moegw_route_consecutive_failures", "Consecutive failures", labels=["route"]
        )
        uptime = GaugeMetricFamily(
            "moegw_route_uptime", "Successful attempts / attempts", labels=["route", "window"]
        )
        for health in self._health():
            circuit.add_metric([health.route_id], 1.0 if health.circuit_open else 0.0)
            failures.add_metric([health.route_id], health.consecutive_failures)
            for window, stats in health.windows.items():
                if stats.uptime is not None:
                    uptime.add_metric([health.route_id, window], stats.uptime)
        yield circuit
        yield failures
        yield uptime
