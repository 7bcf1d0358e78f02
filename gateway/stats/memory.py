"""The in-memory store: used when no REDIS_URL is set (one process, nothing shared).

It keeps the same bucketed windows, circuit state and usage sums the Redis store keeps, so both
stores answer the same questions the same way. What a record costs on the request path is kept
small, as in the Redis store's buffer (pending.py):
  * an attempt's sample is added to one accumulator per (route, fine bucket); the accumulators
    fold into the route's windows (fine, coarse and hour buckets, and the windows' running
    sums) once per `flush_interval_s`, on the first record or health read after it is due, and
    before every read that must be exact (all_health, history, flush);
  * the circuit (consecutive failures) applies at once, and a route's cached health is dropped
    only when its circuit changed or its windows folded, so a success on a healthy route does
    not make the next request rebuild it. A health read therefore sees windows at most
    `flush_interval_s` old; the circuit, which routing acts on, is never behind.
Memory is bounded by the windows' retention (30 fine + 96 coarse + 168 hour buckets per route),
by the usage days kept (`usage_ttl_days`) and, between folds, by one accumulator per route and
minute.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gateway.stats.base import (
    Attempt,
    RecordObserver,
    RouteHealth,
    SeriesPoint,
    StatsOptions,
    Usage,
    UsageTotals,
    check_usage_query,
)
from gateway.stats.circuit import CircuitDelta, CircuitState, HealthEntry, health_entry
from gateway.stats.metrics import StatsMetrics
from gateway.stats.usage import (
    DAY_S,
    UsageKey,
    UsageVector,
    add_into,
    clamp_usage,
    group,
    usage_key,
    usage_vector,
    utc_day,
)
from gateway.stats.windows import (
    EMPTY_WINDOWS,
    FINE_S,
    Bucket,
    LazyWindows,
    RouteWindows,
    bucket_start,
    sample_of,
    series_keys,
    series_point,
)

logger = logging.getLogger("gateway.stats")
_CLOSED = CircuitState()
MAX_ROUTES = 1024  # route ids come from the catalog; this only guards against a runaway caller
# cached healths: the routes with history (<= MAX_ROUTES) and as many never-seen ones asked about
MAX_CACHED_HEALTH = 2 * MAX_ROUTES
_last_record_warning: float | None = None
_last_clamp_warning: float | None = None


def warn_not_recorded(what: str, exc: Exception) -> None:
    """At most one warning a minute: a caller stuck on bad input must not flood the logs (the
    moegw_stats_record_errors_total counter has the full count)."""
    global _last_record_warning
    now = time.monotonic()
    if _last_record_warning is None or now - _last_record_warning >= 60.0:
        _last_record_warning = now
        logger.warning("stats: %s not recorded: %s", what, exc)


def plausible_usage(usage: Usage, metrics: StatsMetrics) -> Usage:
    """The record clamped to its plausible range (usage.clamp_usage); each clamped field is
    counted in moegw_stats_usage_clamped_total{route,field}, and a warning is logged at most
    once a minute (a broken upstream reports on every request)."""
    global _last_clamp_warning
    clamped, fields = clamp_usage(usage)
    if fields:
        for name in fields:
            metrics.usage_clamped.labels(clamped.route_id, name).inc()
        now = time.monotonic()
        if _last_clamp_warning is None or now - _last_clamp_warning >= 60.0:
            _last_clamp_warning = now
            logger.warning(
                "stats: implausible usage from route %s clamped (%s): %s",
                clamped.route_id,
                ", ".join(f"{name}={getattr(usage, name)!r:.40}" for name in fields),
                "see moegw_stats_usage_clamped_total",
            )
    return clamped


def event_time(at: float | None, clock: Callable[[], float]) -> float:
    if at is None:
        return clock()
    if not math.isfinite(at):
        raise ValueError("record time must be finite")
    return float(at)


def check_route(route_id: object) -> str:
    if not isinstance(route_id, str) or not route_id:
        raise ValueError("route_id must be a non-empty string")
    return route_id


class MemoryStats:
    def __init__(
        self,
        options: StatsOptions | None = None,
        *,
        metrics: StatsMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options or StatsOptions()
        self.metrics = metrics or StatsMetrics()
        self.observer: RecordObserver | None = None  # e.g. the dashboard's request log
        self._clock = clock
        self._windows: dict[str, RouteWindows] = {}
        self._circuits: dict[str, CircuitState] = {}
        self._usage: dict[UsageKey, UsageVector] = {}
        # route -> (health, valid from, valid until): dropped on every record of the route
        self._health: dict[str, HealthEntry] = {}
        # route -> fine bucket start -> what attempts added since the last fold (module doc)
        self._unfolded: dict[str, dict[int, Bucket]] = {}
        self._folded_at = -math.inf  # clock time of the last fold
        self._pruned_at = 0
        self.metrics.bind_store(
            pending=lambda: 0,
            pending_entries=lambda: 0,
            connected=lambda: True,
            health=self.all_health,
        )

    # -- writes: synchronous, never raise ------------------------------------------------------

    def record_attempt(self, attempt: Attempt) -> None:
        try:
            route = check_route(attempt.route_id)
            now = self._clock()
            at = now if attempt.at is None else event_time(attempt.at, self._clock)
            if route not in self._windows:
                if len(self._windows) >= MAX_ROUTES:
                    raise ValueError("too many distinct routes")
                self._windows[route] = RouteWindows()
            self.metrics.observe_attempt(attempt)
            if self.observer is not None:
                self.observer.attempt(attempt)
            minutes = self._unfolded.get(route)
            if minutes is None:
                minutes = self._unfolded[route] = {}
            minute = int(at // FINE_S) * FINE_S
            delta = minutes.get(minute)
            if delta is None:
                delta = minutes[minute] = Bucket()
            delta.add_sample(sample_of(attempt))
            circuit = self._circuits.get(route, _CLOSED)
            if not (attempt.ok and circuit.consecutive_failures == 0):  # else nothing changes
                self._circuits[route] = circuit.apply(CircuitDelta.of(attempt.ok, at))
                self._health.pop(route, None)
            if self._fold_due(now):
                self._fold(now)
        except Exception as exc:  # a stats bug must never fail a request
            self.metrics.record_errors.inc()
            warn_not_recorded("attempt", exc)

    def _fold_due(self, now: float) -> bool:
        """flush_interval_s has passed since the last fold (or the clock went back past it)."""
        return not self._folded_at <= now < self._folded_at + self.options.flush_interval_s

    def _fold(self, now: float) -> None:
        """The accumulators into the windows (module doc); their routes' healths rebuild."""
        self._folded_at = now
        unfolded, self._unfolded = self._unfolded, {}
        for route, minutes in unfolded.items():
            windows = self._windows[route]
            for minute, delta in minutes.items():
                windows.add_bucket(minute, delta)
            self._health.pop(route, None)
        self._maybe_prune(now)

    def record_usage(self, usage: Usage) -> None:
        try:
            check_route(usage.route_id)
            at = event_time(usage.at, self._clock)
            usage = plausible_usage(usage, self.metrics)
            self.metrics.observe_usage(usage)
            if self.observer is not None:
                self.observer.usage(usage)
            add_into(self._usage, usage_key(usage, at), usage_vector(usage, clamped=True))
        except Exception as exc:
            self.metrics.record_errors.inc()
            warn_not_recorded("usage", exc)

    # -- reads ---------------------------------------------------------------------------------

    def route_health(self, route_id: str) -> RouteHealth:
        """O(1) on the router's hot path: the cached health while the clock is inside the span
        it holds for (see circuit.health_entry) and no fold is due, else rebuilt once."""
        now = self._clock()
        if self._unfolded and self._fold_due(now):
            self._fold(now)
        entry = self._health.get(route_id)
        if entry is not None and entry[1] <= now < entry[2]:
            return entry[0]
        if route_id in self._unfolded:
            self._fold(now)  # a health built now holds until the next fold: from every record
        return self._build_health(route_id, now)

    def _build_health(self, route_id: str, now: float) -> RouteHealth:
        windows = self._windows.get(route_id)
        circuit = self._circuits.get(route_id, CircuitState())
        lazy = EMPTY_WINDOWS
        if windows is not None:
            found: RouteWindows = windows  # the lambda needs the narrowed type
            lazy = LazyWindows(lambda name: found.window(name, now).stats())
        entry = health_entry(route_id, lazy, circuit, self.options, now)
        if route_id in self._health or len(self._health) < MAX_CACHED_HEALTH:
            self._health[route_id] = entry
        return entry[0]

    def all_health(self) -> list[RouteHealth]:
        if self._unfolded:
            self._fold(self._clock())
        return [self.route_health(route) for route in sorted(self._windows)]

    async def history(self, route_ids: list[str], span: str) -> dict[str, list[SeriesPoint]]:
        if self._unfolded:
            self._fold(self._clock())
        keys = series_keys(span, self._clock())
        out: dict[str, list[SeriesPoint]] = {}
        for route in route_ids:
            windows = self._windows.get(route)
            buckets = windows.buckets if windows is not None else {}
            out[route] = [series_point(key, buckets.get(key)) for key in keys]
        return out

    async def usage(self, *, by: str, day: str | None = None) -> dict[str, UsageTotals]:
        check_usage_query(by, day)
        day = day or utc_day(self._clock())
        return group(((k, v) for k, v in self._usage.items() if k[0] == day), by)

    # -- lifecycle: nothing to connect to -----------------------------------------------------

    async def start(self) -> None:
        return None

    async def flush(self) -> None:
        if self._unfolded:
            self._fold(self._clock())

    async def refresh(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    @property
    def pending(self) -> int:
        return 0

    @property
    def connected(self) -> bool:
        return True

    def _maybe_prune(self, now: float) -> None:
        minute = bucket_start(now, FINE_S)
        if minute == self._pruned_at:
            return
        self._pruned_at = minute
        # pruned buckets are out of every window: no health (cached or not) changes
        for windows in self._windows.values():
            windows.prune(now)
        oldest = utc_day(now - self.options.usage_ttl_days * DAY_S)
        for key in [k for k in self._usage if k[0] < oldest]:
            del self._usage[key]
