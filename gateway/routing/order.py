"""The order of a model's eligible routes (see routing.py for the rules as a whole).

provider.order entries         first, exactly as the client listed them
healthy routes                 weighted random, weight 1/cost² for this request's mix
                               (or deterministic with provider.sort)
recently failed routes         open circuit last, then by consecutive failures, then cost
the local route of last resort at the very end (with sort=price: by price if cheapest)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.catalog import Route
from gateway.routing.prefs import ProviderPrefs, order_index
from gateway.stats.base import RouteHealth

STATS_WINDOWS = ("30m", "1d", "5m")  # where sort=throughput|latency look, in this order
_MIN_COST = 1e-12  # a free route still gets a finite weight
NO_HEALTH = RouteHealth(route_id="")  # placeholder for routes the plan never orders


@dataclass(slots=True)
class RankedRoute:
    """One route evaluated for one token mix (not frozen: built on the hot path)."""

    route: Route
    input_price: float  # effective USD / 1M (overrides applied)
    output_price: float
    completion_tokens: int  # what the cost assumes
    cost: float  # USD for this request's mix
    fit_error: str | None  # why prompt + completion does not fit; None when it fits
    unavailable: str | None  # why the provider cannot take it now; None when it can
    health: RouteHealth

    @property
    def fits(self) -> bool:
        return self.fit_error is None


def recent_stat(health: RouteHealth, name: str) -> float | None:
    """A WindowStats field from the most relevant window that has it."""
    for window in STATS_WINDOWS:
        stats = health.windows.get(window)
        value = getattr(stats, name, None) if stats is not None else None
        if value is not None:
            return float(value)
    return None


def by_cost(e: RankedRoute) -> tuple[float, str]:
    return (e.cost, e.route.id)


def _by_failures(e: RankedRoute) -> tuple[bool, int, float, str]:
    return (e.health.circuit_open, e.health.consecutive_failures, e.cost, e.route.id)


def _by_throughput(e: RankedRoute) -> tuple[float, float, str]:
    tps = recent_stat(e.health, "tokens_per_s")
    return (-tps if tps is not None else math.inf, e.cost, e.route.id)


def _by_latency(e: RankedRoute) -> tuple[float, float, str]:
    p50 = recent_stat(e.health, "latency_p50_s")
    return (p50 if p50 is not None else math.inf, e.cost, e.route.id)


SORT_KEYS: dict[str, Callable[[RankedRoute], tuple[Any, ...]]] = {
    "price": by_cost,
    "throughput": _by_throughput,
    "latency": _by_latency,
}


def route_weight(e: RankedRoute) -> float:
    """The load-balancing weight of a healthy route: 1/cost² for this request's mix."""
    return 1.0 / max(e.cost, _MIN_COST) ** 2


def weighted_shuffle(evals: list[RankedRoute], rng: random.Random) -> list[RankedRoute]:
    """A random order where each next pick has probability ∝ route_weight among those left.

    Efraimidis-Spirakis in log form: key = Exp(1) / weight; ascending.
    """
    if len(evals) < 2:
        return evals
    rand, log = rng.random, math.log
    keyed = [(-log(1.0 - rand()) / route_weight(e), e) for e in evals]
    keyed.sort(key=lambda t: t[0])
    return [e for _, e in keyed]


def _tiers(
    rest: list[RankedRoute], prefs: ProviderPrefs
) -> tuple[list[RankedRoute], list[RankedRoute], list[RankedRoute]]:
    """healthy, recently failing, last resort (the failing and last tiers sorted)."""
    by_price = prefs.sort == "price"
    cheapest = min((e.cost for e in rest), default=0.0) if by_price else 0.0
    healthy: list[RankedRoute] = []
    failing: list[RankedRoute] = []
    last: list[RankedRoute] = []
    for e in rest:
        if e.route.last_resort and not (by_price and e.cost <= cheapest):
            last.append(e)
        elif e.health.circuit_open or e.health.consecutive_failures > 0:
            failing.append(e)
        else:
            healthy.append(e)
    if len(failing) > 1:
        failing.sort(key=_by_failures)
    if len(last) > 1:
        last.sort(key=_by_failures)
    return healthy, failing, last


def first_choice_shares(eligible: list[RankedRoute], prefs: ProviderPrefs) -> dict[str, float]:
    """The share of requests each route is tried first for: the probability that
    `order_routes` puts it first (the weighted tier's weights, or 1.0 for a fixed first)."""
    if not eligible:
        return {}
    if prefs.order and any(order_index(prefs, e.route) is not None for e in eligible):
        return {order_routes(eligible, prefs, random.Random(0))[0].route.id: 1.0}
    healthy, failing, last = _tiers(eligible, prefs)
    if healthy and prefs.sort is None:
        total = sum(route_weight(e) for e in healthy)
        return {e.route.id: route_weight(e) / total for e in healthy}
    if healthy:
        return {min(healthy, key=SORT_KEYS[prefs.sort or "price"]).route.id: 1.0}
    return {(failing or last)[0].route.id: 1.0}


def order_routes(
    eligible: list[RankedRoute], prefs: ProviderPrefs, rng: random.Random
) -> list[RankedRoute]:
    first: list[tuple[int, float, str, RankedRoute]] = []
    rest: list[RankedRoute] = eligible
    if prefs.order:
        rest = []
        for e in eligible:
            i = order_index(prefs, e.route)
            if i is None:
                rest.append(e)
            else:
                first.append((i, e.cost, e.route.id, e))
        first.sort(key=lambda t: t[:3])

    healthy, failing, last = _tiers(rest, prefs)
    if prefs.sort is None:
        healthy = weighted_shuffle(healthy, rng)
    else:
        healthy.sort(key=SORT_KEYS[prefs.sort])
    if first:
        return [t[3] for t in first] + healthy + failing + last
    return healthy + failing + last
