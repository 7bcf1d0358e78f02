"""Which candidates the dispatcher may try now, by circuit state.

A route whose circuit is open (too many consecutive failures, cool-down not over) is skipped,
unless it is the request's last candidate: an open circuit must not make a request wait on a
route that is likely still down, nor make one fail that only it could serve. After the
cool-down the circuit is half-open: this process lets one request at a time probe it (the
others skip it, again unless it is their last candidate); the probe's outcome closes or
reopens the circuit for every replica (stats/circuit.py).
"""

from __future__ import annotations

from enum import Enum

from gateway.stats.base import StatsStore


class Admission(Enum):
    SKIP = "skip"
    TRY = "try"
    PROBE = "probe"  # a half-open route's probe: release() it when the attempt is over


class CircuitGate:
    def __init__(self, stats: StatsStore):
        self._stats = stats
        self._probing: set[str] = set()  # half-open routes with a probe in flight here

    def admit(self, route_id: str, last: bool) -> Admission:
        circuit = self._stats.route_health(route_id).circuit
        if circuit == "closed":
            return Admission.TRY
        if circuit == "open":
            return Admission.TRY if last else Admission.SKIP
        if route_id in self._probing:
            return Admission.TRY if last else Admission.SKIP
        self._probing.add(route_id)
        return Admission.PROBE

    def release(self, route_id: str) -> None:
        self._probing.discard(route_id)
