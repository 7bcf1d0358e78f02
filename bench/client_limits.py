"""What a per-client limit check costs a request, side by side with one Redis round trip.

    .venv/bin/python bench/client_limits.py              # writes docs/benchmarks.md (section)
    .venv/bin/python bench/client_limits.py --no-write

Cases: `ClientQuotas.check` (gateway/quotas.py) in memory and on Redis (loopback), with the
requests/min limit alone and with all three limits (requests/min, tokens/min, daily budget);
for comparison, the `limits` library's fixed-window strategy on the same Redis with one hit or
test per limit (run only when `limits` is installed; the budget read is a plain GET), and a
bare Redis GET. Each figure is the best of --samples samples of --calls checks (µs per check).
Keys live under a fresh prefix in DB 11 and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_section import write_section  # noqa: E402  (bench/ is the script's path)

from gateway.quotas import ClientQuotas  # noqa: E402
from gateway.settings import Settings  # noqa: E402

START, END = "<!-- client_limits:start -->", "<!-- client_limits:end -->"
REDIS_URL = "redis://127.0.0.1:6379/11"
HIGH = {"requests_per_min": 10**9}  # never refuses: every check does the full work
ALL = {"requests_per_min": 10**9, "tokens_per_min": 10**9, "daily_budget_usd": 1e9}


async def best_of(fn: Callable[[], Awaitable[Any]], calls: int, samples: int) -> float:
    for _ in range(50):
        await fn()
    best = float("inf")
    for _ in range(samples):
        started = time.perf_counter()
        for _ in range(calls):
            await fn()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def quotas(redis_url: str | None, prefix: str, limit: dict[str, Any]) -> ClientQuotas:
    settings = Settings(redis_url=redis_url, stats_prefix=prefix, client_limits={"bench": limit})
    return ClientQuotas(settings)


async def limits_library(prefix: str, calls: int, samples: int) -> list[tuple[str, float]]:
    try:
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter
    except ImportError:
        return []
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    storage = RedisStorage(
        "async+" + REDIS_URL,
        implementation="redispy",
        key_prefix=f"{prefix}limits",
        connection_pool=client.connection_pool,  # type: ignore[arg-type]
    )
    window = FixedWindowRateLimiter(storage)
    rpm, tpm = RateLimitItemPerMinute(10**9), RateLimitItemPerMinute(10**9, namespace="tpm")

    async def one() -> None:
        await window.hit(rpm, "bench")

    async def three() -> None:
        await asyncio.gather(
            window.hit(rpm, "bench"), window.test(tpm, "bench"), client.get(f"{prefix}usd")
        )

    rows = [
        ("redis, `limits` library: requests/min", await best_of(one, calls, samples)),
        ("redis, `limits` library: all three limits", await best_of(three, calls, samples)),
    ]
    await client.aclose()
    return rows


async def measure(calls: int, samples: int) -> list[tuple[str, float]]:
    from redis.asyncio import Redis

    prefix = f"moegw-bench-{uuid.uuid4().hex[:8]}:"
    rows: list[tuple[str, float]] = []
    for where, url in (("memory", None), ("redis", REDIS_URL)):
        for label, limit in (("requests/min", HIGH), ("all three limits", ALL)):
            q = quotas(url, prefix, limit)

            async def check(q: ClientQuotas = q) -> None:
                await q.check("bench")

            rows.append((f"{where}, gateway: {label}", await best_of(check, calls, samples)))
            await q.aclose()
    rows += await limits_library(prefix, calls, samples)
    client = Redis.from_url(REDIS_URL)
    get = await best_of(lambda: client.get("x"), calls, samples)
    rows.append(("reference: one Redis GET", get))
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return rows


def report(rows: list[tuple[str, float]], calls: int, samples: int) -> str:
    reference = rows[-1][1]
    lines = [
        START,
        "## Per-client limits (`bench/client_limits.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f}), Python {platform.python_version()}, Redis on "
        f"loopback. Best of {samples} samples x {calls} checks. Goal: one round trip per "
        "request whatever the number of limits; nothing when no limit is configured.",
        "",
        "| case | µs per check | x one Redis GET |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {us:.0f} | {us / reference:.2f} |" for name, us in rows]
    lines += [
        "",
        "The gateway's check is one script call for every configured limit; the `limits` "
        "strategies take one round trip per limit, hence the script.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    text = report(asyncio.run(measure(args.calls, args.samples)), args.calls, args.samples)
    print(text)
    if not args.no_write:
        write_section(text, START, END)


if __name__ == "__main__":
    main()
