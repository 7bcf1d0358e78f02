"""Consecutive failures and the circuit they open, as composable deltas.

A route's circuit is derived, never stored: with `consecutive_failures >= threshold` it is
"open" until `cooldown_s` has passed since the last failure, then "half_open" (the router may
try it again); the next outcome decides: a success resets the count (closed), a failure
refreshes `last_failure_at` (open for another cool-down). Half-open does not limit how many
requests probe the route at once: the router tries an open route last, so probes are rare.

Processes share the state through Redis by sending, per flush, the net effect of their own
outcomes since the previous flush (`CircuitDelta`): "reset to k" when a success happened (k =
failures after the last success) or "add k" when none did. Deltas compose associatively, which
is what lets a buffer coalesce them and a snapshot overlay them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.stats.base import CircuitStatus, RouteHealth, StatsOptions, WindowStats
from gateway.stats.windows import FINE_S, bucket_start


@dataclass(frozen=True, slots=True)
class CircuitDelta:
    reset: bool = False  # a success happened: the count restarts from `trailing`
    trailing: int = 0  # failures after the last success (or all of them, when no success)
    last_failure_at: float | None = None

    @classmethod
    def of(cls, ok: bool, at: float) -> CircuitDelta:
        return cls(reset=True) if ok else cls(trailing=1, last_failure_at=at)

    def then(self, later: CircuitDelta) -> CircuitDelta:
        last = _latest(self.last_failure_at, later.last_failure_at)
        if later.reset:
            return CircuitDelta(True, later.trailing, last)
        return CircuitDelta(self.reset, self.trailing + later.trailing, last)


@dataclass(frozen=True, slots=True)
class CircuitState:
    consecutive_failures: int = 0
    last_failure_at: float | None = None

    def apply(self, delta: CircuitDelta) -> CircuitState:
        base = 0 if delta.reset else self.consecutive_failures
        last = _latest(self.last_failure_at, delta.last_failure_at)
        return CircuitState(base + delta.trailing, last)

    def status(self, options: StatsOptions, now: float) -> CircuitStatus:
        return self.status_span(options, now)[0]

    def status_span(self, options: StatsOptions, now: float) -> tuple[CircuitStatus, float, float]:
        """The status at `now` and the span [start, end) of times it holds for while the state
        stays as it is: "open" ends when the cool-down does, without any new record, so a
        cached health must not outlive `end`. One expression (`cools_at`) decides both the
        status and the span, so a cache and a fresh read can never disagree at the boundary."""
        if self.consecutive_failures < options.failure_threshold:
            return "closed", -math.inf, math.inf
        if self.last_failure_at is None:
            return "half_open", -math.inf, math.inf
        cools_at = self.last_failure_at + options.cooldown_s
        if now < cools_at:
            return "open", -math.inf, cools_at
        return "half_open", cools_at, math.inf


def _latest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# A route's health and the span [start, end) of clock times it stays true for, unless a record
# or a snapshot read changes the state it was built from (the stores drop it then).
HealthEntry = tuple[RouteHealth, float, float]


def health_entry(
    route_id: str,
    windows: Mapping[str, WindowStats],
    circuit: CircuitState,
    options: StatsOptions,
    now: float,
) -> HealthEntry:
    """Builds a route's health for caching. It holds for the current minute at most: windows
    cover whole buckets (60 s fine, 900 s coarse, both aligned on minutes), so they slide only
    when the minute changes; and for the span of the circuit status (an open circuit turns
    half-open when its cool-down ends)."""
    status, start, end = circuit.status_span(options, now)
    minute = bucket_start(now, FINE_S)
    health = RouteHealth(
        route_id=route_id,
        windows=windows,
        consecutive_failures=circuit.consecutive_failures,
        last_failure_at=circuit.last_failure_at,
        circuit_open=status == "open",
        circuit=status,
    )
    return health, max(minute, start), min(minute + FINE_S, end)
