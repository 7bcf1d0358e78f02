"""The Redis store's local copy of what Redis holds, and which keys a tick reads back.

A tick reads, after its batch (in the same pipeline, so the reads see the batch):
    the buckets the batch touched (always: the batch leaves the overlay as it enters here),
    "recent": the current and previous bucket of each length for every known route,
    "full":   every bucket of every window for every known route,
plus the circuit hash of those routes and, on recent/full reads, the shared set of route ids.
Each bucket read replaces the local copy of that bucket, so the copy is as fresh as its last
read: recent buckets every refresh_interval_s, older ones (which only change when another
process flushes a backlog) every full_refresh_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.stats.circuit import CircuitState
from gateway.stats.memory import MAX_ROUTES
from gateway.stats.redis_batch import KeySpace
from gateway.stats.windows import (
    FINE_S,
    Bucket,
    BucketKey,
    RouteWindows,
    all_keys,
    bucket_start,
    recent_keys,
)

ReadScope = Literal["touched", "recent", "full"]


@dataclass(slots=True)
class ReadPlan:
    buckets: list[tuple[str, BucketKey]] = field(default_factory=list)
    circuits: list[str] = field(default_factory=list)
    routes: bool = False

    @property
    def empty(self) -> bool:
        return not self.buckets and not self.circuits and not self.routes


class Snapshot:
    def __init__(self, keys: KeySpace) -> None:
        self.keys = keys
        self.windows: dict[str, RouteWindows] = {}
        self.circuits: dict[str, CircuitState] = {}
        self.routes: set[str] = set()  # known: recorded or asked about here, or seen in Redis
        self._pruned_minute = 0

    def know(self, route: str) -> bool:
        if route in self.routes:
            return True
        if len(self.routes) >= MAX_ROUTES:
            return False
        self.routes.add(route)
        return True

    def plan(self, touched: dict[str, set[BucketKey]], scope: ReadScope, now: float) -> ReadPlan:
        wanted = {route: set(keys) for route, keys in touched.items()}
        plan = ReadPlan(routes=scope != "touched")
        if scope != "touched":
            scope_keys = all_keys(now) if scope == "full" else recent_keys(now)
            for route in self.routes:
                wanted.setdefault(route, set()).update(scope_keys)
        for route, keys in wanted.items():
            plan.buckets += [(route, key) for key in sorted(keys)]
        plan.circuits = sorted(wanted)
        return plan

    def queue_reads(self, pipe: Any, plan: ReadPlan) -> None:
        for route, key in plan.buckets:
            pipe.hgetall(self.keys.window(route, key))
        for route in plan.circuits:
            pipe.hmget(self.keys.circuit(route), "cf", "lf")
        if plan.routes:
            pipe.smembers(self.keys.routes())

    def absorb(self, plan: ReadPlan, replies: list[Any], now: float) -> bool:
        """Puts what was read in place; True when it named routes new to this process."""
        cursor = 0
        for route, key in plan.buckets:
            fields = replies[cursor]
            cursor += 1
            if isinstance(fields, dict):
                bucket = Bucket.from_fields(fields)
                self.windows.setdefault(route, RouteWindows()).replace(key, bucket)
        for route in plan.circuits:
            reply = replies[cursor]
            cursor += 1
            if isinstance(reply, list) and len(reply) == 2:
                failures, last = reply
                last_failure = float(last) if last else None
                self.circuits[route] = CircuitState(int(failures or 0), last_failure)
        learned = False
        if plan.routes and cursor < len(replies) and isinstance(replies[cursor], set | list):
            for route in replies[cursor]:
                learned |= route not in self.routes and self.know(route)
        minute = bucket_start(now, FINE_S)
        if minute != self._pruned_minute:
            self._pruned_minute = minute
            for windows in self.windows.values():
                windows.prune(now)
        return learned
