"""Prometheus text for the backend server's /metrics, read from the engine at scrape time.

    registry = backend_registry(lambda: engine_or_none, load_state)
    body = prometheus_client.generate_latest(registry)

Every value is computed when scraped (a custom collector over Engine.capacity(),
Engine.kv_cache_use() and EngineTelemetry), so the engine thread never touches a metrics
library and an unloaded backend still answers (its load state and progress).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from local_backend.load_progress import LoadState

PREFIX = "local_backend"


def _histogram(name: str, text: str, data: tuple[list[tuple[float, int]], float]) -> Metric:
    cumulative, total = data
    buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in cumulative]
    return HistogramMetricFamily(f"{PREFIX}_{name}", text, buckets=buckets, sum_value=total)


class BackendCollector(Collector):
    def __init__(self, engine: Callable[[], Any], load_state: LoadState) -> None:
        self._engine = engine
        self._load_state = load_state

    def collect(self) -> Iterator[Metric]:
        state = self._load_state
        ready = GaugeMetricFamily(
            f"{PREFIX}_load_state", "1 for the backend's current load state", labels=["state"]
        )
        for phase in ("loading", "ready", "failed"):
            ready.add_metric([phase], 1.0 if state.phase == phase else 0.0)
        yield ready
        progress = state.progress.snapshot()
        yield GaugeMetricFamily(
            f"{PREFIX}_load_bytes", "weight bytes read so far", value=progress["bytes_done"]
        )
        engine = self._engine()
        if engine is None:
            return
        capacity = engine.capacity()
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "requests waiting for a slot", value=capacity.queue_depth
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_running_slots", "KV cache slots held by sequences",
            value=capacity.active_slots,
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{PREFIX}_free_slots", "KV cache slots free", value=capacity.free_slots
        )
        cached, size = engine.kv_cache_use()
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_cache_used_ratio", "cached tokens / tokens the KV cache holds",
            value=cached / size if size else 0.0,
        )  # fmt: skip
        telemetry = engine.telemetry
        rates = telemetry.throughput()
        for kind in ("prefill", "decode"):
            value = rates[f"{kind}_tokens_per_s"]
            yield GaugeMetricFamily(
                f"{PREFIX}_{kind}_tokens_per_second",
                f"{kind} tokens per busy second over the last {rates['window_steps']} passes",
                value=value or 0.0,
            )
        by_batch = GaugeMetricFamily(
            f"{PREFIX}_decode_tokens_per_second_by_batch",
            "decode tokens per busy second at each batch size (rolling)",
            labels=["batch"],
        )
        for batch, figure in rates["decode_by_batch"].items():
            by_batch.add_metric([batch], figure["tokens_per_s"] or 0.0)
        yield by_batch
        snap = telemetry.snapshot()
        tokens = CounterMetricFamily(f"{PREFIX}_tokens", "tokens processed", labels=["phase"])
        tokens.add_metric(["prefill"], snap["prefill_tokens"])
        tokens.add_metric(["decode"], snap["decode_tokens"])
        yield tokens
        cancels = CounterMetricFamily(
            f"{PREFIX}_cancelled_requests",
            "requests whose client went away, by where they were",
            labels=["where"],
        )
        for where, count in snap["cancelled"].items():
            cancels.add_metric([where], count)
        yield cancels
        yield _histogram("ttft_seconds", "submit to first token (queue + prefill)", snap["ttft"])
        yield _histogram(
            "inter_token_seconds",
            "time between a request's token deliveries (one per step)",
            snap["token_gap"],
        )


def backend_registry(engine: Callable[[], Any], load_state: LoadState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackendCollector(engine, load_state))
    return registry
