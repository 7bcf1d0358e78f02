"""Usage accounting shared by both stores: keys, exact sums, grouping.

Usage is aggregated by (UTC day, route, model, client key): any number of records with the
same key fold into one vector of four integers, so a buffer of them never grows with traffic,
only with the number of distinct keys. Cost is summed in integer pico-dollars (1e-12 USD;
a record is rounded by at most 5e-13 USD) so that totals are exact whatever the order of
addition, in memory and in Redis (HINCRBY) alike.

Plausibility. One upstream reporting absurd usage (prompt_tokens=1e14, a negative count, a NaN
cost) must not poison the totals nor overflow Redis's 64-bit counters, so every record is
clamped first (`clamp_usage`; the stores log a warning and count it in
moegw_stats_usage_clamped_total): token counts to [0, MAX_TOKENS_PER_RECORD], cost to
[0, MAX_COST_USD_PER_RECORD]; NaN, -inf and non-numbers become 0, +inf the ceiling. The
ceilings are far above any real request (contexts are ~10^5 tokens, prices at most 10^3 USD
per 1M tokens) and keep one record far from overflowing: a day's token counter needs ~10^11
ceiling-sized records to reach 2^63, its cost counter (pico-USD) ~900. Should a Redis counter
still be about to overflow, the batch script refuses the batch whole and the store resends it
without that one increment (redis_batch.py), so other records are never lost with it.
"""

from __future__ import annotations

import calendar
import json
import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import replace
from typing import TypeVar

from gateway.stats.base import Usage, UsageTotals

PICO_PER_USD = 10**12
USAGE_FIELDS = ("req", "pt", "ct", "cost")  # requests, prompt, completion, cost (pico-USD)
DAY_S = 86_400
MAX_TOKENS_PER_RECORD = 10**8  # per count (prompt, completion) of one record
MAX_COST_USD_PER_RECORD = 10.0**4  # one request costing more is a wrong usage report

UsageKey = tuple[str, str, str, str]  # (day, route, model, client)
UsageVector = list[int]  # [requests, prompt_tokens, completion_tokens, cost_pico_usd]
K = TypeVar("K", bound=Hashable)


_day_cache: tuple[float, float, str] = (0.0, 0.0, "")  # [start, end) of the last day asked


def utc_day(at: float) -> str:
    """The UTC day of a unix time, "YYYY-MM-DD" (the last day's bounds are kept: a strftime
    per record was ~2% of a request's CPU)."""
    global _day_cache
    start, end, day = _day_cache
    if start <= at < end:
        return day
    day = time.strftime("%Y-%m-%d", time.gmtime(at))
    start = (at // DAY_S) * DAY_S
    _day_cache = (start, start + DAY_S, day)
    return day


def day_end(day: str) -> float:
    """Unix time at which a UTC day ends."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d")) + DAY_S


def usage_key(usage: Usage, at: float) -> UsageKey:
    return (utc_day(at), usage.route_id, usage.model, usage.client_key)


def _clamped(value: object, ceiling: float) -> float:
    """value inside [0, ceiling]; anything not a finite real number (NaN, None, "12") is 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return ceiling if value > 0 else 0  # +inf is "too much", NaN and -inf are "unknown"
    return min(max(value, 0), ceiling)


def clamp_usage(usage: Usage) -> tuple[Usage, tuple[str, ...]]:
    """The record with every value inside its plausible range (module doc), and the names of
    the fields that had to change (empty for a sane record: then `usage` itself)."""
    prompt, completion, cost = usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
    if (  # the common case, decided without the general checks below
        type(prompt) is int
        and type(completion) is int
        and type(cost) is float
        and 0 <= prompt <= MAX_TOKENS_PER_RECORD
        and 0 <= completion <= MAX_TOKENS_PER_RECORD
        and 0.0 <= cost <= MAX_COST_USD_PER_RECORD  # (False for NaN)
    ):
        return usage, ()
    prompt = int(_clamped(usage.prompt_tokens, MAX_TOKENS_PER_RECORD))
    completion = int(_clamped(usage.completion_tokens, MAX_TOKENS_PER_RECORD))
    cost = float(_clamped(usage.cost_usd, MAX_COST_USD_PER_RECORD))
    changed = tuple(
        name
        for name, before, after in (
            ("prompt_tokens", usage.prompt_tokens, prompt),
            ("completion_tokens", usage.completion_tokens, completion),
            ("cost_usd", usage.cost_usd, cost),
        )
        if isinstance(before, bool) or not isinstance(before, int | float) or before != after
    )
    if not changed:
        return usage, ()
    return replace(
        usage, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost
    ), changed


def usage_vector(usage: Usage, clamped: bool = False) -> UsageVector:
    """The record as integers. `clamped`: it has been through clamp_usage already (the stores
    do it first); otherwise it is clamped here, so a direct caller cannot fail."""
    if not clamped:
        usage, _ = clamp_usage(usage)
    return [1, usage.prompt_tokens, usage.completion_tokens, round(usage.cost_usd * PICO_PER_USD)]


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
