"""What only the Redis store does: batching, outages, exactly-once flushes, sharing between
stores and processes, key layout. Outage tests run against a redis-server of their own (on a
free port, sometimes behind a fault-injecting proxy); the rest use the shared server's DB 13
under a key prefix of the test's own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from gateway.stats import Attempt, RedisStats, StatsOptions, StatsUnavailableError, Usage
from gateway.stats.usage import utc_day

from .conftest import SHARED_REDIS_URL
from .helpers import T0, FakeClock, FaultProxy, RedisServer, eventually, settle

REPO = Path(__file__).resolve().parents[2]


def attempt(i: int, route: str = "deepinfra/w") -> Attempt:
    return Attempt(
        route,
        ok=i % 4 != 0,
        latency_s=0.2 + (i % 13) * 0.1,
        ttft_s=0.1,
        completion_tokens=30,
        error_kind=None if i % 4 else "http_503",
    )


def usage(i: int, route: str = "deepinfra/w") -> Usage:
    return Usage(route, "wizardlm-2-8x22b", f"client{i % 3}", 100 + i, 10 + i, (110 + 2 * i) * 1e-7)


def usage_sums(records: list[Usage]) -> tuple[int, int, int, float]:
    return (
        len(records),
        sum(u.prompt_tokens for u in records),
        sum(u.completion_tokens for u in records),
        sum(u.cost_usd for u in records),
    )


async def route_usage(store: RedisStats, route: str) -> tuple[int, int, int, float]:
    totals = (await store.usage(by="route", day=utc_day(T0)))[route]
    return totals.requests, totals.prompt_tokens, totals.completion_tokens, totals.cost_usd


def store_on(url: str, clock: FakeClock, **opts: object) -> RedisStats:
    options = StatsOptions(prefix="t:", **opts)  # type: ignore[arg-type]
    return RedisStats(url, options, clock=clock)


def commands(server: RedisServer) -> dict[str, int]:
    stats = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}


async def test_records_are_batched_into_few_round_trips(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = store_on(redis_server.url, clock, flush_interval_s=0.05, refresh_interval_s=0.2)
    redis_server.client().config_resetstat()
    for i in range(100):
        store.record_attempt(attempt(i))
        store.record_usage(usage(i))
    before = commands(redis_server)
    assert "evalsha" not in before and "hincrby" not in before  # recording did no I/O
    assert store.pending == 200
    started = time.monotonic()
    await store.start()
    for chunk in range(50):  # traffic keeps coming while the background task flushes
        for i in range(40):
            store.record_attempt(attempt(chunk * 40 + i))
            store.record_usage(usage(i))
        await asyncio.sleep(0.01)
    assert await eventually(lambda: store.pending == 0)  # no flush() call: the task did it
    ticks_possible = (time.monotonic() - started) / 0.05 + 3
    calls = commands(redis_server)
    batches = calls.get("evalsha", 0) + calls.get("eval", 0)
    assert 1 <= batches <= ticks_possible
    assert 4200 / batches >= 100  # hundreds of records per round trip, not one each
    assert store.route_health("deepinfra/w").windows["5m"].requests == 2100
    await store.aclose()


async def test_outage_serves_keeps_pending_and_flushes_exactly_on_return(
    proxy: FaultProxy, redis_server: RedisServer, clock: FakeClock
) -> None:
    store = store_on(proxy.url, clock, socket_timeout_s=0.5)
    sent = [usage(i) for i in range(300)]
    for i in range(100):
        store.record_attempt(attempt(i))
        store.record_usage(sent[i])
    await store.flush()
    assert store.pending == 0 and store.connected
    assert store.route_health("deepinfra/w").windows["5m"].requests == 100

    proxy.down()
    for i in range(100, 300):
        store.record_attempt(attempt(i))  # must not raise or wait on the dead connection
        store.record_usage(sent[i])
    await store.flush()  # fails quietly
    assert not store.connected and store.pending == 400
    assert store.route_health("deepinfra/w").windows["5m"].requests == 300  # served locally
    assert not await store.ping()
    with pytest.raises(StatsUnavailableError):
        await store.usage(by="route")
    await store.flush()  # a second failed attempt changes nothing
    assert store.pending == 400

    proxy.up()
    await store.flush()
    assert store.pending == 0 and store.connected
    other = store_on(redis_server.url, clock)  # straight to Redis, no proxy
    await other.refresh()
    assert await route_usage(other, "deepinfra/w") == pytest.approx(usage_sums(sent), abs=1e-9)
    window = other.route_health("deepinfra/w").windows["5m"]
    assert (window.requests, window.failures) == (300, 75)
    await store.aclose()
    await other.aclose()


async def test_lost_reply_is_resent_and_applied_once(
    proxy: FaultProxy, redis_server: RedisServer, clock: FakeClock
) -> None:
    store = store_on(proxy.url, clock, socket_timeout_s=0.5)
    store.record_attempt(attempt(1))
    await store.flush()  # loads the script, so the next batch goes out as EVALSHA
    records = [usage(i) for i in range(50)]
    for i, u in enumerate(records):
        store.record_attempt(attempt(i))
        store.record_usage(u)
    proxy.swallow_reply_to(b"EVALSHA")
    await store.flush()
    assert proxy.swallowed == 1  # Redis answered; the store never heard
    assert store.pending == 100  # so it still holds the batch
    direct = store_on(redis_server.url, clock)
    assert await route_usage(direct, "deepinfra/w") == pytest.approx(usage_sums(records))
    proxy.up()
    # a read through the store does not count the applied-but-unacknowledged batch twice
    assert await route_usage(store, "deepinfra/w") == pytest.approx(usage_sums(records))
    await store.flush()  # resent with the same sequence number: acknowledged, not reapplied
    assert store.pending == 0
    assert (
        store.metrics.registry.get_sample_value(
            "moegw_stats_flushes_total", {"result": "duplicate"}
        )
        == 1
    )
    assert await route_usage(direct, "deepinfra/w") == pytest.approx(usage_sums(records))
    await direct.refresh()
    assert direct.route_health("deepinfra/w").windows["5m"].requests == 51
    await store.aclose()
    await direct.aclose()


async def test_redis_restart_with_its_data_loses_and_doubles_nothing(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    store = store_on(redis_server.url, clock, socket_timeout_s=0.5)
    records = [usage(i) for i in range(120)]
    for u in records[:60]:
        store.record_usage(u)
    await store.flush()
    redis_server.stop(save=True)  # a real outage: the process is gone
    for u in records[60:]:
        store.record_usage(u)
    await store.flush()
    assert store.pending == 60 and not store.connected
    redis_server.start()  # same port, the saved data, an empty script cache (NOSCRIPT)
    await store.flush()
    assert store.pending == 0
    assert await route_usage(store, "deepinfra/w") == pytest.approx(usage_sums(records))
    await store.aclose()


async def test_pending_buffer_is_bounded_and_keeps_usage_and_counts(
    proxy: FaultProxy, redis_server: RedisServer, clock: FakeClock
) -> None:
    store = store_on(proxy.url, clock, socket_timeout_s=0.5, max_pending=60)
    proxy.down()
    records = []
    for i in range(3000):
        latency = 0.01 * 1.5 ** (i % 40)  # 40 distinct bins: more than the bound allows
        store.record_attempt(Attempt("r/1", ok=i % 10 != 0, latency_s=latency, at=T0 - i * 0.1))
        records.append(Usage("r/1", "m", f"c{i % 5}", 3, 4, 1e-6, at=T0 - i * 0.1))
        store.record_usage(records[-1])
    await store.flush()
    assert store.pending == 6000
    # the bound, one attempt's overshoot, 2 counters x 8 buckets, 5 usage keys, 1 circuit
    assert store.pending_entries <= 60 + 6 + 2 * 8 + 4 * 5 + 1
    assert store.dropped_samples > 0
    proxy.up()
    await store.flush()
    await store.refresh()
    window = store.route_health("r/1").windows["30m"]
    assert (window.requests, window.failures) == (3000, 300)  # counts are never shed
    assert await route_usage(store, "r/1") == pytest.approx(usage_sums(records))
    await store.aclose()


async def test_two_stores_on_one_redis_see_the_same_health_and_usage(
    prefix: str, clock: FakeClock
) -> None:
    options = StatsOptions(prefix=prefix, failure_threshold=3, cooldown_s=30)
    a = RedisStats(SHARED_REDIS_URL, options, clock=clock)
    b = RedisStats(SHARED_REDIS_URL, options, clock=clock)
    for i in range(40):
        a.record_attempt(attempt(i, "novita/w"))
        a.record_usage(usage(i, "novita/w"))
    for i in range(40, 100):
        b.record_attempt(attempt(i, "novita/w"))
        b.record_usage(usage(i, "novita/w"))
    await settle(a, b)
    assert a.route_health("novita/w") == b.route_health("novita/w")
    assert a.route_health("novita/w").windows["30m"].requests == 100
    assert await a.usage(by="client") == await b.usage(by="client")
    assert sum(t.requests for t in (await a.usage(by="client")).values()) == 100
    # circuit state travels too: A's failures open B's view; B's success closes A's
    for _ in range(3):
        a.record_attempt(Attempt("lepton/w", ok=False, latency_s=5.0, error_kind="timeout"))
    await settle(a, b)
    assert b.route_health("lepton/w").circuit_open
    b.record_attempt(Attempt("lepton/w", ok=True, latency_s=1.0))
    await settle(b, a)
    assert a.route_health("lepton/w").circuit == "closed"
    assert a.route_health("lepton/w").consecutive_failures == 0
    await a.aclose()
    await b.aclose()


async def test_a_second_os_process_shares_uptime_and_usage(prefix: str, clock: FakeClock) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(REPO)!r})
        from gateway.stats import Attempt, RedisStats, StatsOptions, Usage
        async def main():
            store = RedisStats({SHARED_REDIS_URL!r}, StatsOptions(prefix={prefix!r}),
                               clock=lambda: {T0!r})
            for i in range(30):
                store.record_attempt(Attempt("r/p", ok=i % 3 != 0, latency_s=1.0))
                store.record_usage(Usage("r/p", "m", "other-process", 10, 5, 0.001))
            await store.aclose()  # flushes
            print(store.pending)
        asyncio.run(main())
    """)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    here = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), clock=clock)
    for _ in range(20):
        here.record_attempt(Attempt("r/p", ok=True, latency_s=1.0))
        here.record_usage(Usage("r/p", "m", "this-process", 1, 1, 0.002))
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == "0"
    await settle(here)
    window = here.route_health("r/p").windows["5m"]
    assert (window.requests, window.failures) == (50, 10)
    by_client = await here.usage(by="client")
    assert by_client["other-process"].requests == 30
    assert by_client["other-process"].cost_usd == pytest.approx(0.03)
    assert by_client["this-process"].requests == 20
    await here.aclose()


async def test_keys_are_namespaced_and_expire(shared_redis: redis.Redis, prefix: str) -> None:
    clock = FakeClock(time.time())
    store = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), clock=clock)
    store.record_attempt(Attempt("r/k", ok=False, latency_s=1.0, error_kind="connect"))
    store.record_usage(Usage("r/k", "m", "c", 1, 2, 0.5))
    await store.flush()
    keys = {key: shared_redis.ttl(key) for key in shared_redis.scan_iter(match=f"{prefix}*")}
    kinds = {key.removeprefix(prefix).split(":")[0]: ttl for key, ttl in keys.items()}
    assert set(kinds) == {"w", "cb", "routes", "u", "writer"}
    assert all(ttl > 0 for ttl in keys.values())  # nothing lives forever
    fine = [ttl for key, ttl in keys.items() if key.startswith(f"{prefix}w:60:")]
    coarse = [ttl for key, ttl in keys.items() if key.startswith(f"{prefix}w:900:")]
    hour = [ttl for key, ttl in keys.items() if key.startswith(f"{prefix}w:3600:")]
    assert fine and 60 * 60 < max(fine) <= 61 * 60 + 120
    assert coarse and 86_400 - 900 < max(coarse) <= 86_400 + 900 + 120
    assert hour and 7 * 86_400 - 3600 < max(hour) <= 7 * 86_400 + 3600 + 120
    assert 35 * 86_400 <= kinds["u"] <= 36 * 86_400
    field = next(iter(shared_redis.hkeys(f"{prefix}u:{utc_day(clock())}")))
    assert json.loads(field)[:3] == ["r/k", "m", "c"]
    await store.aclose()


async def test_aclose_flushes_what_is_pending(prefix: str, clock: FakeClock) -> None:
    store = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), clock=clock)
    await store.start()
    for i in range(25):
        store.record_usage(usage(i, "r/c"))
    await store.aclose()
    reader = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), clock=clock)
    assert (await reader.usage(by="route", day=utc_day(T0)))["r/c"].requests == 25
    assert await reader.ping()
    await reader.aclose()


async def test_a_rejected_batch_is_retried_and_given_up_only_after_a_minute(
    shared_redis: redis.Redis, prefix: str, clock: FakeClock
) -> None:
    store = RedisStats(SHARED_REDIS_URL, StatsOptions(prefix=prefix), clock=clock)
    writer_key = f"{prefix}writer:{store.writer_id}"
    shared_redis.hset(writer_key, "not", "a sequence number")  # the script's GET: WRONGTYPE
    records = [usage(i, "r/j") for i in range(10)]
    for u in records:
        store.record_usage(u)
    await store.flush()
    assert store.pending == 10  # rejected before writing anything: kept for the next tick
    rejected = {"result": "rejected"}
    assert store.metrics.registry.get_sample_value("moegw_stats_flushes_total", rejected) == 1
    shared_redis.delete(writer_key)  # the cause goes away
    await store.flush()
    assert store.pending == 0
    assert await route_usage(store, "r/j") == pytest.approx(usage_sums(records))
    # a rejection that never goes away is dropped after a minute instead of wedging the channel
    shared_redis.delete(writer_key)
    shared_redis.hset(writer_key, "still", "wrong")
    store.record_usage(usage(0, "r/j"))
    await store.flush()
    assert store.pending == 1
    clock.advance(61)
    await store.flush()
    assert store.pending == 0
    assert await route_usage(store, "r/j") == pytest.approx(usage_sums(records))  # not applied
    await store.aclose()


async def test_background_task_brings_other_processes_records_into_health(
    prefix: str, clock: FakeClock
) -> None:
    fast = StatsOptions(prefix=prefix, flush_interval_s=0.05, refresh_interval_s=0.1)
    reader = RedisStats(SHARED_REDIS_URL, fast, clock=clock)
    writer = RedisStats(SHARED_REDIS_URL, fast, clock=clock)
    await reader.start()
    await writer.start()
    for i in range(12):
        writer.record_attempt(attempt(i, "fresh/route"))  # a route the reader never heard of
    # no flush() or refresh() here: both background tasks do the work
    assert await eventually(lambda: reader.route_health("fresh/route").windows["5m"].requests == 12)
    assert reader.route_health("fresh/route") == writer.route_health("fresh/route")
    health = reader.route_health("fresh/route")
    copied = dataclasses.asdict(health)["windows"]  # a plain dict of computed values
    assert type(copied) is dict and copied["5m"].requests == 12
    assert pickle.loads(pickle.dumps(health)) == health
    await reader.aclose()
    await writer.aclose()
