"""Usage accounting shared by both stores: keys, exact sums, grouping.

Usage is aggregated by (UTC day, route, model, client key): any number of records with the
same key fold into one vector of four integers, so a buffer of them never grows with traffic,
only with the number of distinct keys. Cost is summed in integer pico-dollars (1e-12 USD;
a record is rounded by at most 5e-13 USD) so that totals are exact whatever the order of
addition, in memory and in Redis (HINCRBY) alike.
"""

from __future__ import annotations

import calendar
import json
import math
import time
from collections.abc import Hashable, Iterable
from typing import TypeVar

from gateway.stats.base import Usage, UsageTotals

PICO_PER_USD = 10**12
USAGE_FIELDS = ("req", "pt", "ct", "cost")  # requests, prompt, completion, cost (pico-USD)
DAY_S = 86_400

UsageKey = tuple[str, str, str, str]  # (day, route, model, client)
UsageVector = list[int]  # [requests, prompt_tokens, completion_tokens, cost_pico_usd]
K = TypeVar("K", bound=Hashable)


def utc_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def day_end(day: str) -> float:
    """Unix time at which a UTC day ends."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d")) + DAY_S


def usage_key(usage: Usage, at: float) -> UsageKey:
    return (utc_day(at), usage.route_id, usage.model, usage.client_key)


def usage_vector(usage: Usage) -> UsageVector:
    """Clamps what cannot be right (negative or non-finite) to zero rather than failing."""
    cost = usage.cost_usd if math.isfinite(usage.cost_usd) and usage.cost_usd > 0 else 0.0
    return [
        1,
        max(0, int(usage.prompt_tokens)),
        max(0, int(usage.completion_tokens)),
        round(cost * PICO_PER_USD),
    ]


def add_into(target: dict[K, UsageVector], key: K, vector: UsageVector) -> bool:
    """Adds a vector under a key; returns True when the key is new."""
    current = target.get(key)
    if current is None:
        target[key] = list(vector)
        return True
    for i, value in enumerate(vector):
        current[i] += value
    return False


def encode_field(route: str, model: str, client: str, metric: str) -> str:
    """One Redis hash field per (route, model, client, metric) of a day: unambiguous JSON."""
    return json.dumps([route, model, client, metric], separators=(",", ":"))


def decode_fields(fields: dict[str, str]) -> dict[UsageKey, UsageVector]:
    """The inverse of encode_field over a day's hash; the day is filled in by the caller."""
    out: dict[UsageKey, UsageVector] = {}
    for name, raw in fields.items():
        try:
            route, model, client, metric = json.loads(name)
            index = USAGE_FIELDS.index(metric)
        except (ValueError, TypeError):
            continue  # not ours: ignore rather than fail a dashboard
        vector = out.setdefault(("", route, model, client), [0, 0, 0, 0])
        vector[index] += int(raw)
    return out


def group(entries: Iterable[tuple[UsageKey, UsageVector]], by: str) -> dict[str, UsageTotals]:
    position = {"route": 1, "model": 2, "client": 3}[by]
    sums: dict[str, UsageVector] = {}
    for key, vector in entries:
        add_into(sums, key[position], vector)
    return {
        name: UsageTotals(v[0], v[1], v[2], v[3] / PICO_PER_USD) for name, v in sorted(sums.items())
    }
