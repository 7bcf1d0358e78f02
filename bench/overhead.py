"""What the gateway adds to a request: latency and throughput, side by side with direct calls.

    .venv/bin/python bench/overhead.py              # writes docs/benchmarks.md (overhead section)
    .venv/bin/python bench/overhead.py --no-write --requests 300

Three processes: a fake upstream (tests/fakes/upstream.py, Lepton's dialect, answering at once),
the gateway served exactly as `gateway serve` serves it (uvicorn, uvloop + httptools, in-memory
stats, only the Lepton route configured), and this client (httpx, keep-alive). Every case runs
the same body straight to the fake ("direct") and through the gateway:

- sequential, non-stream and stream: direct and gateway requests interleaved one by one, so
  drift in machine load hits both alike; latency = request sent -> last byte read;
- 64 concurrent clients, non-stream and stream: each side run for the same number of requests;
  requests/s and latency percentiles.
"added" is gateway minus direct at the same percentile. The gateway also reports its own time
per request (`x-gateway-overhead-ms`: wall time minus upstream waits); its median is listed, and
so is the gateway process's CPU time per request (user + system, from /proc), the figure least
moved by the other work on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from doc_section import write_section  # noqa: E402  (bench/ is the script's path)

from providers.http1 import Http1Transport  # noqa: E402

BENCH_DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
MODEL = "wizardlm-2-8x22b"
SLUG = "wizardlm-2-8x22b"  # Lepton's slug for it
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
CONCURRENCY = 64


# -- the two servers (this file runs them as subprocesses) ---------------------------------------


def serve_upstream(port: int) -> None:
    import uvicorn

    from tests.fakes.upstream import FakeUpstreams

    fakes = FakeUpstreams(["lepton"])
    uvicorn.run(
        fakes.app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        interface="asgi3",
        loop="uvloop",
        http="httptools",
    )


def gateway_env(upstream_port: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    for name in ("REDIS_URL", "GATEWAY_API_KEYS", "GATEWAY_ADMIN_TOKEN", "LOCAL_MODEL_DIR"):
        env.pop(name, None)
    env.update(
        LEPTON_API_KEY="sk-bench-0123456789",
        LEPTON_BASE_URL=f"http://127.0.0.1:{upstream_port}/lepton/v1",
        LOG_LEVEL="warning",
        PYTHONPATH=str(ROOT),
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# -- measuring ------------------------------------------------------------------------------------


class ProcessCPU:
    """CPU seconds (user + system) a process has used so far; None where /proc is missing."""

    def __init__(self, pid: int):
        self.path = Path(f"/proc/{pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def seconds(self) -> float | None:
        try:
            fields = self.path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime


def cpu_ms_per_request(cpu: ProcessCPU | None, before: float | None, n: int) -> float | None:
    after = cpu.seconds() if cpu is not None else None
    return None if after is None or before is None else (after - before) * 1000 / n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Target:
    def __init__(self, client: httpx.AsyncClient, url: str, model: str):
        self.client = client
        self.url = url
        self.model = model
        self.overheads: list[float] = []
        self.first_bytes: list[float] = []  # request sent -> first body bytes

    async def call(self, stream: bool) -> float:
        body: dict[str, Any] = {"model": self.model, "messages": MESSAGES, "max_tokens": 16}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        first = None
        async with self.client.stream("POST", self.url, json=body) as response:
            async for _ in response.aiter_raw():
                if first is None:
                    first = time.perf_counter() - started
        elapsed = time.perf_counter() - started
        self.first_bytes.append(elapsed if first is None else first)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {response.status_code}")
        overhead = response.headers.get("x-gateway-overhead-ms")
        if overhead is not None:
            self.overheads.append(float(overhead))
        return elapsed


async def sequential(
    direct: Target, gateway: Target, stream: bool, n: int, cpu: ProcessCPU | None = None
) -> dict[str, Any]:
    for _ in range(max(20, n // 10)):  # warm both paths: pools, caches, branch predictors
        await direct.call(stream)
        await gateway.call(stream)
    gateway.overheads.clear()
    direct.first_bytes.clear()
    gateway.first_bytes.clear()
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    cpu_before = cpu.seconds() if cpu is not None else None  # the gateway idles between its calls
    for _ in range(n):
        times["direct"].append(await direct.call(stream))
        times["gateway"].append(await gateway.call(stream))
    return {
        "gateway_cpu_ms": cpu_ms_per_request(cpu, cpu_before, n),
        **{f"{side}_{q}": pct(v, p) * 1000 for side, v in times.items() for q, p in _QS},
        # Each gateway request ran right after its direct twin: the median of the pairs'
        # differences is the added latency least disturbed by the machine's other work.
        "paired_added_p50": statistics.median(
            (g - d) * 1000 for g, d in zip(times["gateway"], times["direct"], strict=True)
        ),
        "first_byte_added_p50": (
            statistics.median(gateway.first_bytes) - statistics.median(direct.first_bytes)
        )
        * 1000,
        "overhead_ms_p50": statistics.median(gateway.overheads),
        "direct_rps": n / sum(times["direct"]),
        "gateway_rps": n / sum(times["gateway"]),
    }


_QS = (("p50", 0.50), ("p99", 0.99))


async def concurrent(
    target: Target, stream: bool, n: int, cpu: ProcessCPU | None = None
) -> tuple[list[float], float, float | None]:
    latencies: list[float] = []
    per_worker = max(1, n // CONCURRENCY)

    async def worker() -> None:
        for _ in range(per_worker):
            latencies.append(await target.call(stream))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY // 4)))  # warm-up
    latencies.clear()
    cpu_before = cpu.seconds() if cpu is not None else None
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    rps = len(latencies) / (time.perf_counter() - started)
    return latencies, rps, cpu_ms_per_request(cpu, cpu_before, len(latencies))


async def concurrent_case(
    direct: Target, gateway: Target, stream: bool, n: int, cpu: ProcessCPU | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, target in (("direct", direct), ("gateway", gateway)):
        latencies, rps, cpu_ms = await concurrent(
            target, stream, n, cpu if side == "gateway" else None
        )
        for q, p in _QS:
            out[f"{side}_{q}"] = pct(latencies, p) * 1000
        out[f"{side}_rps"] = rps
    out["gateway_cpu_ms"] = cpu_ms
    out["overhead_ms_p50"] = statistics.median(gateway.overheads[-n:])
    return out


async def run_cases(
    upstream: str, gateway_url: str, n: int, n_concurrent: int, cpu: ProcessCPU | None = None
) -> list[Any]:
    # The client uses the gateway's own lean transport too: on 2 cores a heavier client would
    # steal CPU from the servers it measures. Both sides pay the same client cost.
    transport = Http1Transport(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        direct = Target(client, f"{upstream}/lepton/v1/chat/completions", SLUG)
        gateway = Target(client, f"{gateway_url}/v1/chat/completions", MODEL)
        cases: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("sequential, non-stream", lambda: sequential(direct, gateway, False, n, cpu)),
            ("sequential, stream", lambda: sequential(direct, gateway, True, n, cpu)),
            (
                f"{CONCURRENCY} concurrent, non-stream",
                lambda: concurrent_case(direct, gateway, False, n_concurrent, cpu),
            ),
            (
                f"{CONCURRENCY} concurrent, stream",
                lambda: concurrent_case(direct, gateway, True, n_concurrent, cpu),
            ),
        ]
        results = []
        for name, case in cases:
            result = await case()
            print(f"{name}: {result}", flush=True)
            results.append((name, result))
        return results


# -- reporting ------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ms(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    return "" if value is None else f"{value:.2f} ms"


def render(results: list[Any], n: int, n_concurrent: int) -> str:
    rows = [
        "| case | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 "
        "| direct req/s | gateway req/s | gateway's own time p50 | gateway CPU per request "
        "| added p50, first byte | added, median of pairs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        rows.append(
            f"| {name} | {r['direct_p50']:.2f} ms | {r['gateway_p50']:.2f} ms "
            f"| **{r['gateway_p50'] - r['direct_p50']:.2f} ms** | {r['direct_p99']:.2f} ms "
            f"| {r['gateway_p99']:.2f} ms | {r['gateway_p99'] - r['direct_p99']:.2f} ms "
            f"| {r['direct_rps']:.0f} | {r['gateway_rps']:.0f} | {r['overhead_ms_p50']:.3f} ms "
            f"| {_ms(r, 'gateway_cpu_ms')} "
            f"| {_ms(r, 'first_byte_added_p50')} | {_ms(r, 'paired_added_p50')} |"
        )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join(
        [
            START,
            "## Gateway overhead (`bench/overhead.py`)",
            "",
            f"Measured {when} on {os.cpu_count()} × {cpu_name()}, Python "
            f"{platform.python_version()}, by `python bench/overhead.py`: {n} sequential "
            f"requests per side, {n_concurrent} per side at {CONCURRENCY} concurrent; load "
            f"average {load} when it ended (the machine is shared). One fake upstream answering "
            "at once, the gateway as `gateway serve` runs it (uvloop + httptools, in-memory "
            "stats) and the client (httpx on the gateway's own HTTP/1.1 transport) share the "
            'machine. Latency is request sent -> last byte. "added" = gateway - direct at the '
            "same percentile; *gateway's own time* is its `x-gateway-overhead-ms` header (wall "
            "time in the gateway minus upstream waits, up to the response; the served answer's "
            "stats writes come after it); *gateway CPU per request* is the gateway process's "
            "user + system CPU time over the case divided by its requests (everything: uvicorn, "
            "routing, the upstream call, stats).",
            "",
            *rows,
            "",
            "The median-of-pairs column pairs each gateway request with the direct one sent just "
            "before it "
            "(sequential cases): the median of those differences is the least noisy figure on a "
            "shared machine. "
            "For streams the last byte follows the whole answer; the first-byte column is what a "
            "streaming client waits for before its first token. "
            "At 64 concurrent clients the three processes compete for the same cores, so the "
            "added latency there is mostly queueing behind the client and the upstream, not "
            "gateway work; the sequential rows are the per-request cost.",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="sequential, per side")
    parser.add_argument("--concurrent-requests", type=int, default=2560, help="per side")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--role", choices=["upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port)
        return

    upstream_port, gateway_port = free_port(), free_port()
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--role", "upstream", "--port", str(upstream_port)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            **quiet,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from gateway.cli import main; main()",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(gateway_port),
            ],
            env=gateway_env(upstream_port, gateway_port),
            **quiet,
        ),
    ]
    try:
        wait_listening(upstream_port)
        wait_listening(gateway_port)
        results = asyncio.run(
            run_cases(
                f"http://127.0.0.1:{upstream_port}",
                f"http://127.0.0.1:{gateway_port}",
                args.requests,
                args.concurrent_requests,
                ProcessCPU(processes[1].pid),
            )
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
    text = render(results, args.requests, args.concurrent_requests)
    print(text)
    if not args.no_write:
        write_section(text, START, END)
        print(f"wrote {BENCH_DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
