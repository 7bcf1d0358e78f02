"""Stats side channel: uptime, latency, circuit state and usage, in Redis or in memory.

    metrics = StatsMetrics()
    stats = make_stats(settings.redis_url, metrics=metrics, prefix=settings.stats_prefix,
                       flush_interval_s=settings.stats_flush_interval_s,
                       max_pending=settings.stats_max_pending)
    await stats.start(); ...; await stats.aclose()

Options are the fields of `StatsOptions`; an unknown one is a TypeError naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.stats.base import (
    Attempt,
    RouteHealth,
    StatsOptions,
    StatsStore,
    StatsUnavailableError,
    Usage,
    UsageTotals,
    WindowStats,
)
from gateway.stats.memory import MemoryStats
from gateway.stats.metrics import StatsMetrics, render_metrics
from gateway.stats.redis_store import RedisStats

__all__ = [
    "Attempt",
    "MemoryStats",
    "RedisStats",
    "RouteHealth",
    "StatsMetrics",
    "StatsOptions",
    "StatsStore",
    "StatsUnavailableError",
    "Usage",
    "UsageTotals",
    "WindowStats",
    "make_stats",
    "render_metrics",
]


def make_stats(
    redis_url: str | None,
    *,
    metrics: StatsMetrics | None = None,
    clock: Callable[[], float] = time.time,
    **opts: Any,
) -> MemoryStats | RedisStats:
    """The Redis store when a URL is given, the in-memory one otherwise (same interface)."""
    options = StatsOptions(**opts)
    if redis_url:
        return RedisStats(redis_url, options, metrics=metrics, clock=clock)
    return MemoryStats(options, metrics=metrics, clock=clock)
