"""route_health() is a cached read (the router calls it for every candidate of every request):
these tests prove the cache is dropped when what a health is made of changes: at once for the
circuit, by the store's next tick for the windows (a success on a healthy route, recorded on
every request, does not make the next request rebuild it). Each test first shows the cache is in
use (`is` the same object), then changes one input: a record of the route, a tick that reads
Redis (another process's records), the clock crossing a circuit's cool-down, the clock crossing
a minute (windows slide)."""

from __future__ import annotations

import dataclasses
import pickle
import random

from gateway.stats import Attempt, MemoryStats, RedisStats, RouteHealth, StatsOptions
from gateway.stats.memory import MAX_CACHED_HEALTH
from gateway.stats.windows import FINE_S, bucket_start

from .conftest import SHARED_REDIS_URL, StoreFactory
from .helpers import T0, FakeClock, settle


def fail(route: str, at: float | None = None) -> Attempt:
    return Attempt(route, ok=False, latency_s=1.0, error_kind="timeout", at=at)


def success(route: str, at: float | None = None) -> Attempt:
    return Attempt(route, ok=True, latency_s=0.5, ttft_s=0.1, completion_tokens=40, at=at)


async def test_a_record_replaces_the_cached_health_at_once_or_by_the_next_tick(
    make_store: StoreFactory,
) -> None:
    """A record that changes the circuit (a failure; a success after failures) replaces the
    cached health at once. A success on a healthy route, which the request path records on
    every request, leaves it in place until the store's next tick (in memory a fold, in Redis
    a flush and refresh), whose health then includes it."""
    store = make_store(failure_threshold=3, cooldown_s=30)
    route, other = "deepinfra/w", "lepton/w"
    before = store.route_health(route)
    assert store.route_health(route) is before  # served from the cache
    store.record_attempt(success(route))
    await settle(store)
    after = store.route_health(route)
    assert after is not before and after.windows["5m"].requests == 1
    store.record_attempt(success(route))
    assert store.route_health(route) is after  # the circuit did not change: not rebuilt yet
    await settle(store)
    after = store.route_health(route)
    assert after.windows["5m"].requests == 2
    assert store.route_health(route) is after
    store.record_attempt(success(other))  # another route's record leaves this entry alone
    assert store.route_health(route) is after
    for expected in ("closed", "closed", "open"):
        store.record_attempt(fail(route))
        assert store.route_health(route).circuit == expected  # no flush, no refresh needed
    health = store.route_health(route)
    assert health.circuit_open and health.consecutive_failures == 3
    assert health.windows["5m"].requests == 5 and health.windows["5m"].failures == 3
    store.record_attempt(success(route))
    health = store.route_health(route)
    assert health.circuit == "closed" and health.consecutive_failures == 0
    assert health.windows["5m"].requests == 6
    assert store.route_health(other).windows["5m"].requests == 1


async def test_cool_down_turns_a_cached_open_circuit_half_open_without_a_record(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(failure_threshold=2, cooldown_s=10)
    route = "novita/w"
    store.record_attempt(fail(route))
    store.record_attempt(fail(route))
    await settle(store)
    opened = store.route_health(route)
    assert opened.circuit == "open" and opened.circuit_open
    clock.advance(9.5)
    assert store.route_health(route) is opened  # still cooling down: the cached answer holds
    clock.advance(0.5)  # the cool-down ends at T0 + 10, still within the same minute ...
    assert bucket_start(clock(), FINE_S) == bucket_start(T0, FINE_S)  # ... so only it expires
    half_open = store.route_health(route)
    assert half_open.circuit == "half_open" and not half_open.circuit_open
    assert half_open.recently_failed and half_open.consecutive_failures == 2
    assert store.route_health(route) is half_open
    clock.now = T0 + 5  # a clock stepped back must not be served the later answer
    assert store.route_health(route).circuit == "open"
    clock.now = T0 + 10
    store.record_attempt(fail(route))  # a failed probe reopens at once
    assert store.route_health(route).circuit == "open"
    clock.advance(10)
    assert store.route_health(route).circuit == "half_open"


async def test_windows_slide_at_the_minute_without_a_record(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    route = "openrouter/w"
    store.record_attempt(success(route))
    await settle(store)
    health = store.route_health(route)
    assert (health.windows["5m"].requests, health.windows["30m"].requests) == (1, 1)
    clock.advance(4 * 60)  # the record's minute is still one of the five newest
    assert store.route_health(route).windows["5m"].requests == 1
    clock.advance(60)  # now it is not: no record, no refresh, yet the 5m window is empty
    windows = store.route_health(route).windows
    assert windows["5m"].requests == 0 and windows["5m"].uptime is None
    assert windows["30m"].requests == 1 and windows["1d"].requests == 1


async def test_never_seen_routes_share_the_empty_windows(make_store: StoreFactory) -> None:
    store = make_store()
    first, second = store.route_health("nobody/a"), store.route_health("nobody/b")
    assert (first.route_id, second.route_id) == ("nobody/a", "nobody/b")
    assert first.windows is second.windows  # one shared constant
    assert store.route_health("nobody/a") is first
    assert all(w.requests == 0 and w.uptime is None for w in first.windows.values())
    assert first.circuit == "closed" and not first.recently_failed
    assert pickle.loads(pickle.dumps(first)) == first
    assert dataclasses.asdict(first)["windows"]["1d"].requests == 0
    store.record_attempt(fail("nobody/a"))
    health = store.route_health("nobody/a")
    assert health.windows["5m"].failures == 1 and health.consecutive_failures == 1
    assert store.route_health("nobody/b") is second


async def test_memory_cache_stays_bounded_for_a_runaway_caller() -> None:
    store = MemoryStats()
    for i in range(MAX_CACHED_HEALTH + 500):
        assert store.route_health(f"made/up-{i}").route_id == f"made/up-{i}"
    assert len(store._health) <= MAX_CACHED_HEALTH
    store.record_attempt(fail("real/route"))
    assert store.route_health("real/route").consecutive_failures == 1


def circuit_of(health: RouteHealth) -> tuple[object, ...]:
    return (health.circuit, health.consecutive_failures, health.last_failure_at)


async def test_cached_health_always_equals_a_fresh_read(clock: FakeClock) -> None:
    """Random records (some late, some early), clock steps (some backwards, some across
    cool-downs and minutes) and reads; after each step the store's (cached) circuit must equal
    that of a new store that replays the same records and has never cached anything, and so
    must the whole health once the records folded (a flush; memory.py folds windows at most
    flush_interval_s late, the circuit never)."""
    options = StatsOptions(failure_threshold=2, cooldown_s=7)
    rng = random.Random(5)
    routes = ["a/x", "b/x", "c/x"]
    store = MemoryStats(options, clock=clock)
    recorded: list[Attempt] = []
    stale = 0  # reads whose windows were behind the records (the fold was not due yet)
    for _ in range(160):
        action = rng.random()
        if action < 0.45:
            at = clock() + rng.choice([0.0, 0.0, -30.0, -400.0, 20.0])
            attempt = Attempt(rng.choice(routes), rng.random() < 0.4, rng.uniform(0.1, 3), at=at)
            store.record_attempt(attempt)
            recorded.append(attempt)
        elif action < 0.85:
            clock.advance(rng.choice([0.1, 0.5, 3.0, 6.9, 7.0, 29.0, 61.0]))
        else:
            clock.advance(-rng.choice([0.5, 3.0, 8.0]))
        fresh = MemoryStats(options, clock=clock)
        for attempt in recorded:
            fresh.record_attempt(attempt)
        for route in routes:
            cached, truth = store.route_health(route), fresh.route_health(route)
            assert circuit_of(cached) == circuit_of(truth), (route, clock())
            stale += cached != truth
        if rng.random() < 0.5:
            await store.flush()
            for route in routes:
                assert store.route_health(route) == fresh.route_health(route), (route, clock())
    assert stale > 0  # the run did read between folds (else it proves nothing about them)


async def test_memory_windows_fold_within_one_flush_interval(clock: FakeClock) -> None:
    """A success on a healthy route leaves its cached health in place (the request path does
    not rebuild it); the windows catch up at the next read once flush_interval_s has passed,
    without a flush. A failure drops the cached health at once, windows included."""
    store = MemoryStats(StatsOptions(flush_interval_s=0.5), clock=clock)
    route = "a/x"
    store.record_attempt(success(route))  # the first record folds at once
    cached = store.route_health(route)
    assert cached.windows["5m"].requests == 1
    store.record_attempt(success(route))
    clock.advance(0.4)
    assert store.route_health(route) is cached  # one record behind, within the interval
    clock.advance(0.1)
    caught_up = store.route_health(route)
    assert caught_up is not cached and caught_up.windows["5m"].requests == 2
    store.record_attempt(fail(route))
    failed = store.route_health(route)
    assert failed.consecutive_failures == 1 and failed.windows["5m"].failures == 1
    assert failed.windows["5m"].requests == 3


async def test_a_refresh_from_redis_replaces_the_cached_health(
    prefix: str, clock: FakeClock
) -> None:
    options = StatsOptions(prefix=prefix, failure_threshold=3, cooldown_s=30)
    here = RedisStats(SHARED_REDIS_URL, options, clock=clock)
    there = RedisStats(SHARED_REDIS_URL, options, clock=clock)  # another gateway process
    route = "deepinfra/w"
    await here.refresh()
    empty = here.route_health(route)
    assert empty.windows["5m"].requests == 0 and here.route_health(route) is empty
    for _ in range(3):
        there.record_attempt(fail(route))
    await settle(there)
    assert here.route_health(route) is empty  # nothing read from Redis here yet
    await here.refresh()
    health = here.route_health(route)
    assert health.circuit == "open" and health.consecutive_failures == 3
    assert health.windows["5m"].requests == 3
    there.record_attempt(success(route))  # the other process's success closes it ...
    await settle(there)
    await here.refresh()
    health = here.route_health(route)  # ... here too, after the next read
    assert health.circuit == "closed" and health.windows["5m"].requests == 4
    await here.aclose()
    await there.aclose()


async def test_a_flush_reads_back_what_others_did_to_the_routes_it_sent(
    prefix: str, clock: FakeClock
) -> None:
    """The flush tick (no full refresh) reads back the routes of its batch: the cached health
    of those routes must be replaced by what Redis now holds, others' records included."""
    options = StatsOptions(prefix=prefix, failure_threshold=3, cooldown_s=30)
    here = RedisStats(SHARED_REDIS_URL, options, clock=clock)
    there = RedisStats(SHARED_REDIS_URL, options, clock=clock)
    route = "novita/w"
    here.record_attempt(fail(route))
    here.record_attempt(fail(route))
    mine = here.route_health(route)
    assert (mine.consecutive_failures, mine.circuit) == (2, "closed")
    assert here.route_health(route) is mine
    there.record_attempt(fail(route))
    await there.flush()
    await here.flush()  # Redis: 1 + 2 consecutive failures; the read-back says so
    assert here.pending == 0
    health = here.route_health(route)
    assert (health.consecutive_failures, health.circuit) == (3, "open")
    assert health.windows["5m"].requests == 3  # the batch is in the snapshot, not counted twice
    await here.aclose()
    await there.aclose()
