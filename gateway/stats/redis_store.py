"""The Redis store: what several gateway processes share (REDIS_URL set).

Hot path: `record_*` fold into the local buffer (pending.py) and return; no I/O. A background
task ticks every `flush_interval_s`; each tick is ONE pipelined round trip holding
    [EVALSHA apply-batch (when there is something to send)]  -- redis_batch.py, exactly once
    [HGETALL of the buckets that batch touched, plus the recent (every refresh_interval_s) or
     all (every full_refresh_s) buckets of every known route; HMGET of their circuit state;
     SMEMBERS of the route set]
Because the reads run after the script on the server, the snapshot they return already holds
the batch, so the batch leaves the local overlay exactly when it enters the snapshot: health is
never missing or double counting this process's records.

Health = snapshot (what Redis said at the last tick) + overlay (the batch in flight and the
buffer), so a process sees its own records at once and everyone's within ~refresh_interval_s.
A route's health is cached: a record that changes its circuit drops it at once; a success on a
route without failures (what the request path records on every request) leaves it to the next
tick that reads the route (every refresh_interval_s; with Redis away, the minute's end), so
the windows routing sorts by are at most that old while the circuit is never behind.

Redis down: ticks fail fast (socket timeouts), `connected` turns False, records keep folding
into the bounded buffer and the in-flight batch is resent unchanged on each tick until Redis
answers: nothing lost, nothing applied twice. An error *reply* to the batch (READONLY during a
failover, OOM, a foreign key in our namespace) is retried the same way, and dropped with an
error log once it has been rejected for GIVE_UP_REJECTED_S, so that a permanent error cannot
wedge the channel. The script checks every op before writing and claims the sequence number
last, so a refused batch applied nothing; one refused because a counter would overflow is
resent at once without that increment (redis_batch.py), never dropped whole.
aclose() flushes for up to close_timeout_s.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.stats.base import (
    Attempt,
    RecordObserver,
    RouteHealth,
    SeriesPoint,
    StatsOptions,
    StatsUnavailableError,
    Usage,
    UsageTotals,
    WindowStats,
    check_usage_query,
)
from gateway.stats.circuit import CircuitDelta, CircuitState, HealthEntry, health_entry
from gateway.stats.memory import check_route, event_time, plausible_usage, warn_not_recorded
from gateway.stats.metrics import StatsMetrics
from gateway.stats.pending import PendingDeltas
from gateway.stats.redis_batch import (
    KeySpace,
    SealedBatch,
)
from gateway.stats.redis_sync import _IO_ERRORS, RedisSync
from gateway.stats.snapshot import ReadPlan, Snapshot
from gateway.stats.usage import add_into, decode_fields, group, utc_day
from gateway.stats.windows import (
    EMPTY_WINDOWS,
    FINE_S,
    Bucket,
    LazyWindows,
    bucket_start,
    in_window,
    series_keys,
    series_point,
    window_stats,
)

logger = logging.getLogger("gateway.stats")


class RedisStats(RedisSync):
    def __init__(
        self,
        redis_url: str,
        options: StatsOptions | None = None,
        *,
        metrics: StatsMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options or StatsOptions()
        self.metrics = metrics or StatsMetrics()
        self.observer: RecordObserver | None = None  # e.g. the dashboard's request log
        self._clock = clock
        self._redis = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=self.options.socket_timeout_s,
            socket_connect_timeout=self.options.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),  # our ticks are the retries; a batch is resent as is
        )
        self._keys = KeySpace(self.options.prefix)
        self.writer_id = uuid.uuid4().hex
        self._seq = 0
        self._pending = PendingDeltas()
        self._sealed: SealedBatch | None = None
        self._snapshot = Snapshot(self._keys)
        # route -> (health, valid from, valid until): dropped on a record that changes the
        # route's circuit and on every tick that reads the route (see _absorb; module doc)
        self._health: dict[str, HealthEntry] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._send_script_body = False
        self._rejected_since: float | None = None
        self._connected = False
        self._pruned_minute = 0
        self.dropped_samples = 0
        self.metrics.bind_store(
            pending=lambda: self.pending,
            pending_entries=lambda: self.pending_entries,
            connected=lambda: self._connected,
            health=self.all_health,
        )

    # -- writes: synchronous, never raise, no I/O ---------------------------------------------

    def record_attempt(self, attempt: Attempt) -> None:
        try:
            route = check_route(attempt.route_id)
            at = event_time(attempt.at, self._clock)
            if not self._snapshot.know(route):
                raise ValueError("too many distinct routes")
            self.metrics.observe_attempt(attempt)
            if self.observer is not None:
                self.observer.attempt(attempt)
            self._pending.add_attempt(attempt, at, with_samples=self._room_for_samples())
            entry = self._health.get(route)
            if entry is not None and not (attempt.ok and entry[0].consecutive_failures == 0):
                del self._health[route]  # the circuit changes (a success on a healthy route
                # leaves the windows to the next tick: module doc)
        except Exception as exc:  # a stats bug must never fail a request
            self.metrics.record_errors.inc()
            warn_not_recorded("attempt", exc)

    def record_usage(self, usage: Usage) -> None:
        try:
            check_route(usage.route_id)
            at = event_time(usage.at, self._clock)
            usage = plausible_usage(usage, self.metrics)
            self.metrics.observe_usage(usage)
            if self.observer is not None:
                self.observer.usage(usage)
            self._pending.add_usage(usage, at)
        except Exception as exc:
            self.metrics.record_errors.inc()
            warn_not_recorded("usage", exc)

    def _room_for_samples(self) -> bool:
        if self.pending_entries < self.options.max_pending:
            return True
        now = self._clock()
        minute = bucket_start(now, FINE_S)
        if minute != self._pruned_minute:  # pruning walks the buffer: at most once a minute
            self._pruned_minute = minute
            self._pending.prune(now)
            if self.pending_entries < self.options.max_pending:
                return True
        self.dropped_samples += 1
        self.metrics.dropped_samples.inc()
        return False

    @property
    def pending(self) -> int:
        return self._pending.records + (self._sealed.deltas.records if self._sealed else 0)

    @property
    def pending_entries(self) -> int:
        return self._pending.entries + (self._sealed.deltas.entries if self._sealed else 0)

    @property
    def connected(self) -> bool:
        return self._connected

    # -- reads ---------------------------------------------------------------------------------

    def route_health(self, route_id: str) -> RouteHealth:
        """O(1) on the router's hot path: the cached health while the clock is inside the span
        it holds for (see circuit.health_entry), else rebuilt once."""
        now = self._clock()
        entry = self._health.get(route_id)
        if entry is not None and entry[1] <= now < entry[2]:
            return entry[0]
        return self._build_health(route_id, now)

    def _build_health(self, route_id: str, now: float) -> RouteHealth:
        if isinstance(route_id, str) and route_id:
            self._snapshot.know(route_id)  # so refreshes fetch what other processes recorded
        overlays = self._overlays()
        circuit = self._snapshot.circuits.get(route_id, CircuitState())
        for deltas in overlays:
            circuit = circuit.apply(deltas.circuits.get(route_id, CircuitDelta()))
        lazy: Mapping[str, WindowStats] = EMPTY_WINDOWS
        if route_id in self._snapshot.windows or any(route_id in d.windows for d in overlays):
            lazy = LazyWindows(lambda name: self._window_stats(route_id, name, now))
        entry = health_entry(route_id, lazy, circuit, self.options, now)
        # only routes every recent/full read covers (bounded by MAX_ROUTES), so that no change
        # can reach a route's data without passing through _forget
        if route_id in self._snapshot.routes:
            self._health[route_id] = entry
        return entry[0]

    def _forget(self, routes: Iterable[str]) -> None:
        for route in routes:
            self._health.pop(route, None)

    def _absorb(self, plan: ReadPlan, replies: list[Any], now: float) -> bool:
        """Puts a tick's reads into the snapshot and drops the cached health of every route
        they covered (which includes every route of the batch the tick sent)."""
        try:
            return self._snapshot.absorb(plan, replies, now)
        finally:
            self._forget(plan.circuits)

    def _overlays(self) -> list[PendingDeltas]:
        """What this process recorded that the snapshot does not hold yet."""
        return [self._sealed.deltas, self._pending] if self._sealed else [self._pending]

    def _window_stats(self, route_id: str, name: str, now: float) -> WindowStats:
        snapshot = self._snapshot.windows.get(route_id)
        parts = [snapshot.window(name, now)] if snapshot else []
        for deltas in self._overlays():
            buckets = deltas.windows.get(route_id, {})
            parts += [bucket for key, bucket in buckets.items() if in_window(key, name, now)]
        return window_stats(parts)

    def all_health(self) -> list[RouteHealth]:
        return [self.route_health(route) for route in sorted(self._snapshot.routes)]

    async def history(self, route_ids: list[str], span: str) -> dict[str, list[SeriesPoint]]:
        """Read from Redis, so every replica's records are in it (this process's last
        flush_interval_s of records may not be yet)."""
        keys = series_keys(span, self._clock())
        pipe = self._redis.pipeline(transaction=False)
        for route in route_ids:
            for key in keys:
                pipe.hgetall(self._keys.window(route, key))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except _IO_ERRORS as exc:
            raise StatsUnavailableError("Redis is unreachable") from exc
        out: dict[str, list[SeriesPoint]] = {}
        for n, route in enumerate(route_ids):
            points = []
            for m, key in enumerate(keys):
                fields = replies[n * len(keys) + m]
                bucket = Bucket.from_fields(fields) if isinstance(fields, dict) and fields else None
                points.append(series_point(key, bucket))
            out[route] = points
        return out

    async def usage(self, *, by: str, day: str | None = None) -> dict[str, UsageTotals]:
        """Redis's totals plus this process's records Redis does not hold yet."""
        check_usage_query(by, day)
        day = day or utc_day(self._clock())
        async with self._lock:
            sealed = self._sealed
            for attempt in range(2):  # the first use of a pooled connection may find it stale
                pipe = self._redis.pipeline(transaction=False)
                pipe.hgetall(self._keys.usage(day))
                pipe.get(self._keys.writer(self.writer_id))
                try:
                    fields, applied = await pipe.execute(raise_on_error=False)
                    break
                except _IO_ERRORS as exc:
                    self._mark(False, exc)
                    if attempt:
                        message = "usage totals are unavailable: Redis is down"
                        raise StatsUnavailableError(message) from exc
            if isinstance(fields, Exception):
                raise StatsUnavailableError("usage totals are unavailable: Redis refused the read")
            if isinstance(applied, Exception):
                applied = None  # a foreign value under our writer key: the batch did not apply
            entries = decode_fields(fields)
            local = [self._pending] + ([sealed.deltas] if sealed else [])
            if sealed and applied is not None and int(applied) >= sealed.seq:
                local.pop()  # its reply was lost, but Redis holds it already
            for deltas in local:
                for (d, route, model, client), vector in deltas.usage.items():
                    if d == day:
                        add_into(entries, ("", route, model, client), vector)
        return group(entries.items(), by)
