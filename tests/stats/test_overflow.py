"""Absurd usage cannot poison the totals nor take other records down with it.

An upstream reporting prompt_tokens=1e14 once made the batch script's HINCRBY overflow int64
half-way through a batch: Redis kept the writer's seq (set first), so the resend was taken as a
duplicate and the rest of the batch -- other clients' usage -- was lost. Three defences:
records are clamped (usage.clamp_usage), the script checks everything before writing and claims
the seq last, and a batch refused for an overflow is resent without that one increment.
"""

from __future__ import annotations

import math

import pytest
import redis

from gateway.stats import RedisStats, StatsMetrics, StatsOptions, Usage
from gateway.stats.pending import PendingDeltas
from gateway.stats.redis_batch import APPLY_BATCH_LUA, MAX_INCREMENT, KeySpace, seal
from gateway.stats.usage import (
    MAX_COST_USD_PER_RECORD,
    MAX_TOKENS_PER_RECORD,
    clamp_usage,
    encode_field,
    utc_day,
)

from .conftest import SHARED_REDIS_URL, StoreFactory
from .helpers import T0, FakeClock
from .test_metrics import samples

ROUTE = "lepton/wizardlm-2-8x22b"
OTHER = "openrouter/microsoft/wizardlm-2-8x22b"
MODEL = "wizardlm-2-8x22b"
INT64_MAX = 2**63 - 1


def sane(client: str, route: str = ROUTE) -> Usage:
    return Usage(route, MODEL, client, 5, 2, 0.25)


def poison(client: str = "p", route: str = ROUTE) -> Usage:
    """What a broken upstream reported: 1e14 prompt tokens priced as such (5e19 pico-USD)."""
    return Usage(route, MODEL, client, 10**14, 1, 5e7)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("prompt_tokens", 10**14, MAX_TOKENS_PER_RECORD),
        ("prompt_tokens", -3, 0),
        ("prompt_tokens", math.nan, 0),
        ("completion_tokens", math.inf, MAX_TOKENS_PER_RECORD),
        ("completion_tokens", "12", 0),
        ("cost_usd", 5e7, MAX_COST_USD_PER_RECORD),
        ("cost_usd", -1.0, 0.0),
        ("cost_usd", math.nan, 0.0),
        ("cost_usd", -math.inf, 0.0),
    ],
)
def test_implausible_values_are_clamped_and_named(
    field: str, value: object, expected: float
) -> None:
    record = Usage(ROUTE, MODEL, "k", 5, 2, 0.25)
    bad = Usage(**{**{f: getattr(record, f) for f in record.__slots__}, field: value})
    clamped, fields = clamp_usage(bad)
    assert fields == (field,)
    assert getattr(clamped, field) == expected
    for other in ("prompt_tokens", "completion_tokens", "cost_usd"):
        if other != field:
            assert getattr(clamped, other) == getattr(record, other)


def test_a_sane_record_passes_unchanged() -> None:
    record = Usage(ROUTE, MODEL, "k", MAX_TOKENS_PER_RECORD, 0, 0)  # at the ceiling is fine
    assert clamp_usage(record) == (record, ())


async def test_stores_clamp_absurd_usage_and_count_it(make_store: StoreFactory) -> None:
    store = make_store()
    store.record_usage(poison())
    store.record_usage(sane("a"))
    await store.flush()
    totals = (await store.usage(by="route", day=utc_day(T0)))[ROUTE]
    assert totals.requests == 2
    assert totals.prompt_tokens == MAX_TOKENS_PER_RECORD + 5
    assert totals.cost_usd == pytest.approx(MAX_COST_USD_PER_RECORD + 0.25)
    got = samples(store.metrics)
    for name in ("prompt_tokens", "cost_usd"):
        key = ("moegw_stats_usage_clamped_total", (("field", name), ("route", ROUTE)))
        assert got[key] == 1
    assert (
        "moegw_stats_usage_clamped_total",
        (("field", "completion_tokens"), ("route", ROUTE)),
    ) not in got
    # the Prometheus counters see the clamped record too, not 1e14
    rm = (("model", MODEL), ("route", ROUTE))
    assert got[("moegw_prompt_tokens_total", rm)] == MAX_TOKENS_PER_RECORD + 5


async def test_the_review_scenario_counts_every_other_record_once(make_store: StoreFactory) -> None:
    """a, b, poison, c, d alternating over two routes, one batch: 5 requests in Redis."""
    store = make_store()
    for i, who in enumerate(["a", "b", "poison", "c", "d"]):
        route = ROUTE if i % 2 else OTHER
        store.record_usage(poison(who, route) if who == "poison" else sane(who, route))
    for _ in range(3):
        await store.flush()
    assert store.pending == 0
    by_client = await store.usage(by="client", day=utc_day(T0))
    assert {name: t.requests for name, t in by_client.items()} == dict.fromkeys(
        ["a", "b", "poison", "c", "d"], 1
    )
    for who in "abcd":
        assert (by_client[who].prompt_tokens, by_client[who].completion_tokens) == (5, 2)
    assert by_client["poison"].prompt_tokens == MAX_TOKENS_PER_RECORD


def _usage_key(prefix: str) -> str:
    return KeySpace(prefix).usage(utc_day(T0))


async def test_a_full_counter_drops_only_its_own_increment(
    prefix: str, shared_redis: redis.Redis, clock: FakeClock
) -> None:
    """Last defence: a Redis counter already near 2^63 (clamping cannot prevent that) makes the
    script refuse the batch whole; the store resends it without that increment."""
    full = encode_field(ROUTE, MODEL, "whale", "cost")
    near_max = INT64_MAX - 10
    shared_redis.hset(_usage_key(prefix), full, near_max)
    metrics = StatsMetrics()
    store = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), metrics=metrics, clock=clock)
    try:
        store.record_usage(sane("whale"))
        for who in ("a", "b", "c"):
            store.record_usage(sane(who))
        await store.flush()
        assert store.pending == 0
        by_client = await store.usage(by="client", day=utc_day(T0))
        for who in ("a", "b", "c"):
            assert (by_client[who].requests, by_client[who].prompt_tokens) == (1, 5)
            assert by_client[who].cost_usd == pytest.approx(0.25)
        # the whale's other counters applied; its full one kept its value (no wrap, no error)
        assert (by_client["whale"].requests, by_client["whale"].prompt_tokens) == (1, 5)
        assert int(str(shared_redis.hget(_usage_key(prefix), full))) == near_max
        assert samples(metrics)[("moegw_stats_batch_increments_dropped_total", ())] == 1
        # and exactly once: the writer's seq was claimed, a resend is a duplicate
        assert int(str(shared_redis.get(KeySpace(prefix).writer(store.writer_id)))) == 1
    finally:
        await store.aclose()


def test_the_script_applies_nothing_of_a_batch_it_refuses(
    prefix: str, shared_redis: redis.Redis
) -> None:
    """Raw script: the overflowing op comes after others; none of them, nor the seq, apply."""
    space = KeySpace(prefix)
    writer, first, second = space.writer("w"), f"{prefix}h1", f"{prefix}h2"
    shared_redis.hset(second, "x", INT64_MAX - 1)
    args: list[str | int] = [1, 60, "s", 4, "r1", "h", 2, 1, "a", 7, "x", 2, 60, "h", 3, 1, "x", 5]
    with pytest.raises(redis.ResponseError, match="overflow 3 x"):
        shared_redis.eval(APPLY_BATCH_LUA, 4, writer, first, second, space.routes(), *args)
    assert shared_redis.exists(writer, first, space.routes()) == 0
    assert int(str(shared_redis.hget(second, "x"))) == INT64_MAX - 1
    # the same batch without the bad op applies whole, seq last
    ok = args[:13]
    assert shared_redis.eval(APPLY_BATCH_LUA, 4, writer, first, second, space.routes(), *ok) == 1
    assert shared_redis.hget(first, "a") == "7" and shared_redis.get(writer) == "1"
    assert shared_redis.sismember(space.routes(), "r1")


def test_the_script_refuses_a_foreign_key_type_before_writing(
    prefix: str, shared_redis: redis.Redis
) -> None:
    space = KeySpace(prefix)
    writer, first, foreign = space.writer("w"), f"{prefix}h1", f"{prefix}str"
    shared_redis.set(foreign, "not a hash")
    args: list[str | int] = [1, 60, "h", 2, 1, "a", 7, "h", 3, 1, "b", 1]
    with pytest.raises(redis.ResponseError, match="not a hash"):
        shared_redis.eval(APPLY_BATCH_LUA, 3, writer, first, foreign, *args)
    assert shared_redis.exists(writer, first) == 0


def test_seal_caps_each_aggregated_increment() -> None:
    """Many ceiling-sized records folded into one batch still make an int64 argument."""
    deltas = PendingDeltas()
    record = Usage(ROUTE, MODEL, "k", 1, 1, MAX_COST_USD_PER_RECORD)
    for _ in range(1000):  # 1000 x 1e4 USD = 1e19 pico-USD > 2^63
        deltas.add_usage(record, T0)
    assert deltas.usage[(utc_day(T0), ROUTE, MODEL, "k")][3] > INT64_MAX
    batch = seal(
        deltas,
        space=KeySpace("p:"),
        writer_id="w",
        seq=1,
        writer_ttl_s=60,
        usage_ttl_days=1,
        now=T0,
    )
    increments = [a for a in batch.args if isinstance(a, int)]
    assert max(increments) == MAX_INCREMENT <= INT64_MAX
