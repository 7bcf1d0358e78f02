"""What the stats side channel costs a request, and what batching saves, side by side.

    .venv/bin/python bench/stats.py              # writes docs/benchmarks.md (stats section)
    .venv/bin/python bench/stats.py --no-write

Cases (µs per call, median over --samples samples of --calls calls):
- record_attempt / record_usage on the in-memory and the Redis store (the Redis one never does
  I/O here: that is the point), Prometheus counters included;
- route_health: cached (nothing recorded since the last read), for a route never seen (cached
  too), right after a success on a healthy route (the request path's usual case: the cached
  health stays until the store's next tick), right after a failure (the circuit changes: the
  cached health is dropped and rebuilt; windows are computed lazily) and with one window read;
- reference: json.loads of a short chat body, which every request pays anyway.
Flush (needs Redis at --redis-url, DB 13, a prefix of its own, deleted afterwards): the time to
persist N attempts + N usages as one batch (one round trip, the store's flush) against the same
writes sent one request at a time (the same script, one call and one round trip per request:
what a store without batching would do on the request path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from doc_section import write_section  # noqa: E402  (bench/ is the script's path)

from gateway.stats import (  # noqa: E402
    Attempt,
    MemoryStats,
    RedisStats,
    RouteHealth,
    StatsOptions,
    Usage,
)
from gateway.stats.pending import PendingDeltas  # noqa: E402
from gateway.stats.redis_batch import APPLY_BATCH_LUA, KeySpace, seal  # noqa: E402

BENCH_DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- stats:start -->", "<!-- stats:end -->"
ROUTES = [f"provider{i}/wizardlm-2-8x22b" for i in range(5)]


def per_call_us(fn: Callable[[], object], calls: int, samples: int) -> float:
    for _ in range(calls // 10 + 1):
        fn()
    results = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(results)


def attempt(i: int) -> Attempt:
    latency = 0.5 + (i % 50) * 0.03
    return Attempt(ROUTES[i % 5], i % 20 != 0, latency, ttft_s=0.2, completion_tokens=120)


def usage(i: int) -> Usage:
    return Usage(ROUTES[i % 5], "wizardlm-2-8x22b", f"key{i % 7}", 800, 120, 0.00046)


def store_cases(
    name: str, store: MemoryStats | RedisStats
) -> list[tuple[str, Callable[[], object]]]:
    counter = iter(range(10**9))

    def record_then_read() -> RouteHealth:
        store.record_attempt(attempt(0))  # a failure: the circuit changes
        return store.route_health(ROUTES[0])

    def success_then_read() -> RouteHealth:
        store.record_attempt(attempt(1))  # ROUTES[1] never fails: the circuit stays closed
        return store.route_health(ROUTES[1])

    return [
        (f"{name}: record_attempt", lambda: store.record_attempt(attempt(next(counter)))),
        (f"{name}: record_usage", lambda: store.record_usage(usage(next(counter)))),
        (f"{name}: route_health, cached", lambda: store.route_health(ROUTES[0])),
        (f"{name}: route_health, route never seen", lambda: store.route_health("never/seen")),
        (f"{name}: record a success + route_health (the usual request)", success_then_read),
        (f"{name}: record a failure + route_health", record_then_read),
        (f"{name}: the same + read the 30m window", lambda: record_then_read().windows["30m"]),
    ]


def hot_path(calls: int, samples: int, redis_url: str) -> list[tuple[str, float]]:
    memory = MemoryStats()
    shared = RedisStats(redis_url, StatsOptions(prefix=f"bench:{uuid.uuid4().hex}:"))
    for store in (memory, shared):
        for i in range(2000):  # history so that windows have something to sum
            store.record_attempt(attempt(i))
    raw = json.dumps({"model": "wizardlm-2-8x22b", "messages": [{"role": "user", "content": "Hi"}]})
    cases = store_cases("memory", memory) + store_cases("redis", shared)
    cases.append(("reference: json.loads(short body)", lambda: json.loads(raw)))
    return [(name, per_call_us(fn, calls, samples)) for name, fn in cases]


async def flush_cost(redis_url: str, records: int) -> list[tuple[str, float]]:
    prefix = f"bench:{uuid.uuid4().hex}:"
    store = RedisStats(redis_url, StatsOptions(prefix=prefix))
    client = aioredis.Redis.from_url(redis_url)
    try:
        await store.refresh()
        for i in range(records):
            store.record_attempt(attempt(i))
            store.record_usage(usage(i))
        start = time.perf_counter()
        await store.flush()
        batched = time.perf_counter() - start
        assert store.pending == 0
        # no batching: each request sends its own writes (the same script, one record each)
        space = KeySpace(prefix + "naive:")
        start = time.perf_counter()
        for i in range(records):
            one = PendingDeltas()
            one.add_attempt(attempt(i), time.time(), with_samples=True)
            one.add_usage(usage(i), time.time())
            batch = seal(
                one,
                space=space,
                writer_id="naive",
                seq=i + 1,
                writer_ttl_s=600,
                usage_ttl_days=1,
                now=time.time(),
            )
            await client.eval(APPLY_BATCH_LUA, len(batch.keys), *batch.keys, *batch.args)
        one_by_one = time.perf_counter() - start
    finally:
        await store.aclose()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return [
        (f"{records} attempts + {records} usages, one batch (ms)", batched * 1000),
        (f"the same, one script call per request: {records} round trips (ms)", one_by_one * 1000),
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]  # a shared box inflates every figure: say how busy it was
    python = platform.python_version()
    return f"{cpu} ({os.cpu_count()} cores, load average {load:.1f}), Python {python}"


def section(
    rows: list[tuple[str, float]], flush: list[tuple[str, float]], calls: int, samples: int
) -> str:
    reference = rows[-1][1]
    lines = [
        START,
        "## Stats side channel (`bench/stats.py`)",
        "",
        f"Machine: {machine()}, Redis on loopback. Median of {samples} samples x {calls} calls. "
        "Goal: recording and health reads cost a request a few µs and never a round trip.",
        "",
        "| case | µs per call | x json.loads(body) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {us:.1f} | {us / reference:.1f} |" for name, us in rows]
    lines += ["", "| flush | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in flush]
    lines += [
        "",
        f"Batching: {flush[1][1] / flush[0][1]:.0f}x less time spent in Redis I/O for the same "
        "records, and none of it on the request path.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows = hot_path(args.calls, args.samples, args.redis_url)
    flush = asyncio.run(flush_cost(args.redis_url, args.records))
    text = section(rows, flush, args.calls, args.samples)
    print(text)
    if not args.no_write:
        write_section(text, START, END)


if __name__ == "__main__":
    main()
