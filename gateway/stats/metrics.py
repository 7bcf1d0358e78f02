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

import re
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.stats.base import Attempt, RouteHealth, Usage
from gateway.stats.hot_series import HotSeries

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def outcome_label(ok: bool, kind: str | None) -> str:
    """A bounded label value: "ok", or the error kind cut to 32 safe characters."""
    if ok:
        return "ok"
    return _LABEL_UNSAFE.sub("_", kind or "error")[:32] or "error"


class StatsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # the per-request series: plain accumulators, read at scrape time (hot_series.py)
        self.hot = HotSeries(LATENCY_BUCKETS, TTFT_BUCKETS)
        r.register(self.hot)
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

    def observe_attempt(self, attempt: Attempt) -> None:
        outcome = "ok" if attempt.ok else outcome_label(False, attempt.error_kind)
        self.hot.attempt(attempt.route_id, outcome, attempt.latency_s, attempt.ttft_s)

    def observe_usage(self, usage: Usage) -> None:
        hot = self.hot
        hot.request(usage.route_id, usage.model, "ok")
        hot.usage(
            usage.route_id,
            usage.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cost_usd,
        )

    def observe_failed_request(self, model: str, outcome: str, route_id: str | None = None) -> None:
        """The dispatcher's final failure of a whole request (served ones come from usage)."""
        self.hot.request(route_id or "none", model, outcome_label(False, outcome))

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
