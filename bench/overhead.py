"""What the gateway adds to a request: latency, CPU and throughput, side by side with direct calls.

    python bench/overhead.py                        # writes docs/benchmarks.md (overhead section)
    python bench/overhead.py --no-write --requests 500 --seconds 5
    python bench/overhead.py --baseline ../main     # another checkout's gateway in the same run

Processes: a fake upstream (tests/fakes/upstream.py, Lepton's dialect, answering at once; a
50-chunk stream), the gateway exactly as `gateway serve` runs it (in-memory stats, only the
Lepton route configured), and the load generators of bench/loadgen.py: a raw-socket client for
the sequential cases, `wrk` for the concurrent ones. Core layouts (stated in the report):
  * sequential, "one core": the gateway, the upstream and the client all on core 0. Each
    request's steps run one after another on that core, so "added" is the gateway's own path
    (its CPU and two context switches), with no wake-up of an idle core in it;
  * sequential, "client on another core": the gateway alone on core 0, the upstream and the
    client on core 1. Through the gateway a request then wakes an idle core four times, directly
    never (the client and the upstream share core 1): on a VM each such wake-up of an idle
    vCPU costs tens of µs and cold caches, which the added figure then includes;
  * concurrent: the gateway alone on core 0, the upstream and wrk on the others (`--workers 2`:
    the gateway on cores 0 and 1). Targets alternate (sequential: blocks of 100 pairs; wrk:
    round by round), so the machine's drift hits all alike: ratios come from one run.

Figures: latency p50/p99 (request sent -> last byte; for streams also the first byte), "added"
= gateway - direct; the median of per-pair differences (each gateway request beside the direct
one sent just before it); the gateway's `x-gateway-overhead-ms` header; the gateway's CPU per
request (user + system of its process(es) from /proc over the case / requests served).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_section import write_section  # noqa: E402  (bench/ is the script's path)
from loadgen import (  # noqa: E402
    ProcessCPU,
    RawClient,
    cpu_set,
    encode_post,
    header,
    pin,
    repin,
    run_wrk,
    status,
    wrk_available,
)
from overhead_report import cpu_name, render_concurrent, render_sequential  # noqa: E402

START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
MODEL, SLUG = "wizardlm-2-8x22b", "wizardlm-2-8x22b"  # our id, Lepton's slug
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
STREAM_CHUNKS = 50
CONNECTIONS = 64
GW_PATH, DIRECT_PATH = "/v1/chat/completions", "/lepton/v1/chat/completions"


def body(model: str, stream: bool) -> bytes:
    data: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 64}
    if stream:
        data["stream"] = True
    return json.dumps(data).encode()


# -- the servers ----------------------------------------------------------------------------------


def serve_upstream(port: int) -> None:
    import uvicorn

    from tests.fakes.upstream import FakeUpstreams

    fakes = FakeUpstreams(["lepton"])
    fakes["lepton"].tokens = [f" w{i}" for i in range(STREAM_CHUNKS)]
    quiet = {"log_level": "warning", "access_log": False, "interface": "asgi3"}
    uvicorn.run(fakes.app, host="127.0.0.1", port=port, http="httptools", **quiet)  # type: ignore[arg-type]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_answering(port: int, path: str, payload: bytes, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = RawClient(port)
            try:
                if status(client.post(path, payload).head) == 200:
                    return
            finally:
                client.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers on port {port}")
        time.sleep(0.2)


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, port: int):
        self.name, self.port = name, port
        quiet: Any = subprocess.DEVNULL
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=quiet, stderr=quiet)
        self.cpu = ProcessCPU(self.process.pid, children=True)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def gateway_env(checkout: Path, upstream_port: int) -> dict[str, str]:
    """`checkout`'s gateway: the Lepton route alone, on the fake upstream; in-memory stats."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    for key in ("REDIS_URL", "GATEWAY_API_KEYS", "GATEWAY_ADMIN_TOKEN", "LOCAL_MODEL_DIR"):
        env.pop(key, None)
    env.update(
        LEPTON_API_KEY="sk-bench-0123456789",
        LEPTON_BASE_URL=f"http://127.0.0.1:{upstream_port}/lepton/v1",
        LOG_LEVEL="warning",
        PYTHONPATH=str(checkout),
    )
    return env


def start_gateway(
    name: str, checkout: Path, upstream_port: int, cpus: str | None, workers: int = 1
) -> Server:
    env = gateway_env(checkout, upstream_port)
    port = free_port()
    command = [*pin(cpus), sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    server = Server(name, command, env, checkout, port)
    wait_answering(port, GW_PATH, body(MODEL, False))
    return server


# -- the cases ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


BLOCK = 100  # sequential: consecutive pairs through one gateway before the next one's turn


def sequential(
    upstream_port: int,
    gateways: list[Server],
    stream: bool,
    n: int,
    aside: tuple[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """n pairs per gateway (a direct request, then one through the gateway; raw-socket client),
    the gateways taking turns every BLOCK pairs. Blocks rather than one request each in turn: on
    one core, two gateways alternating request by request evict each other's code and data from
    the core's caches, and both would be measured slower than either runs alone. `aside`: (the
    measured core, another): during a block the gateways not measured wait on the other core,
    so that their idle timers do not run on the measured one."""
    names = [g.name for g in gateways]
    direct = RawClient(upstream_port)
    direct_request = encode_post("127.0.0.1", DIRECT_PATH, body(SLUG, stream))
    clients = {g.name: RawClient(g.port) for g in gateways}
    request = encode_post("127.0.0.1", GW_PATH, body(MODEL, stream))
    for _ in range(max(50, n // 10)):  # warm-up: pools, caches
        direct.send(direct_request)
        for name in names:
            clients[name].send(request)
    total: dict[str, list[float]] = {name: [] for name in ["direct", *names]}
    first: dict[str, list[float]] = {name: [] for name in ["direct", *names]}
    own: dict[str, list[float]] = {name: [] for name in names}
    pairs: dict[str, list[float]] = {name: [] for name in names}
    cpu_before = {g.name: g.cpu.seconds() for g in gateways}
    for start in range(0, n, BLOCK):
        for name in names:
            if aside is not None and len(gateways) > 1:
                for g in gateways:
                    repin(g.process.pid, aside[0] if g.name == name else aside[1])
            for _ in range(min(BLOCK, n - start)):
                before = direct.send(direct_request)
                timing = clients[name].send(request)
                total["direct"].append(before.total_s * 1000)
                first["direct"].append(before.first_byte_s * 1000)
                total[name].append(timing.total_s * 1000)
                first[name].append(timing.first_byte_s * 1000)
                pairs[name].append((timing.total_s - before.total_s) * 1000)
                own[name].append(float(header(timing.head, "x-gateway-overhead-ms") or "nan"))
    out: dict[str, dict[str, float]] = {}
    for name in ["direct", *names]:
        row = {"p50": pct(total[name], 0.5), "p99": pct(total[name], 0.99)}
        row["first_p50"] = pct(first[name], 0.5)
        if name != "direct":
            row["paired_added_p50"] = statistics.median(pairs[name])
            row["own_p50"] = statistics.median(own[name])
            server = next(g for g in gateways if g.name == name)
            after, before_s = server.cpu.seconds(), cpu_before[name]
            row["cpu_ms"] = (after - before_s) * 1000 / n if after and before_s else float("nan")
        out[name] = row
    direct.close()
    for client in clients.values():
        client.close()
    return out


def concurrent(
    upstream_port: int,
    gateways: list[Server],
    stream: bool,
    seconds: float,
    rounds: int,
    cpus: str | None,
) -> dict[str, dict[str, float]]:
    """wrk at CONNECTIONS connections against each target in turn, `rounds` times; the best
    round of each target (the least disturbed by the machine's other work) is reported."""
    targets: list[tuple[str, int, str, str, Server | None]] = [
        ("direct", upstream_port, DIRECT_PATH, SLUG, None)
    ]
    targets += [(g.name, g.port, GW_PATH, MODEL, g) for g in gateways]
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, port, path, model, server in targets:
            before = server.cpu.seconds() if server else None
            result = run_wrk(
                f"http://127.0.0.1:{port}{path}",
                body(model, stream),
                connections=CONNECTIONS,
                seconds=seconds,
                cpus=cpus,
            )
            row = {"rps": result.rps, "p50": result.p50_ms, "p99": result.p99_ms}
            row["errors"] = result.errors
            if server is not None and before is not None:
                after = server.cpu.seconds()
                row["cpu_ms"] = (after - before) * 1000 / max(result.requests, 1) if after else 0
            if name not in best or row["rps"] > best[name]["rps"]:
                best[name] = row
    return best


# -- the report -----------------------------------------------------------------------------------


def render(sections: list[str], args: argparse.Namespace, layout: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join(
        [
            START,
            "## Gateway overhead (`bench/overhead.py`)",
            "",
            f"Measured {when} on {os.cpu_count()} × {cpu_name()}, Python "
            f"{platform.python_version()}: {args.requests} sequential requests per target and "
            f"case; wrk (1 thread, {CONNECTIONS} connections) {args.rounds} rounds of "
            f"{args.seconds:g} s per target, best round shown; load average {load} when it "
            f"ended (the machine is shared). {layout} Fake upstream answering at once "
            f"(non-stream: one JSON body; stream: {STREAM_CHUNKS} chunks). Gateway: "
            "`gateway serve` (uvloop + httptools, in-memory stats, log level warning). "
            '"added" = gateway − direct; *own time* = the `x-gateway-overhead-ms` header '
            "(wall time from the request's bytes to the response ready, minus time blocked "
            "on the upstream socket); *CPU per request* = the gateway's user + system CPU over "
            "the case / requests.",
            "",
            *sections,
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per target")
    parser.add_argument("--seconds", type=float, default=8.0, help="one wrk round")
    parser.add_argument("--rounds", type=int, default=2, help="wrk rounds per target")
    parser.add_argument("--baseline", type=Path, help="another checkout, measured alongside")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--role", choices=["upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port)
        return

    cores = os.cpu_count() or 1
    gateway_cpus = "0" if cores >= 2 else None
    others = (f"1-{cores - 1}" if cores > 2 else "1") if cores >= 2 else None
    workers_cpus = ("0,1" if cores >= 2 else None) if cores < 4 else "0,1"
    rest = f"2-{cores - 1}" if cores >= 4 else others
    layout = (
        f'Core layouts: sequential "one core": gateway, upstream and client all on core '
        f'{gateway_cpus}; sequential "client on another core": gateway on core {gateway_cpus}, '
        f"upstream and client on {others}; concurrent: gateway on core {gateway_cpus}, upstream "
        f"and wrk on {others}; the `--workers 2` case: gateway on cores {workers_cpus}, "
        f"upstream and wrk on {rest}"
        + (" (with 2 cores, shared with the gateway's workers)." if cores < 4 else ".")
    )
    os.sched_setaffinity(0, cpu_set(others or "0"))
    upstream_port = free_port()
    role = ["--role", "upstream", "--port", str(upstream_port)]
    upstream = Server(
        "upstream",
        [*pin(others), sys.executable, __file__, *role],
        {**os.environ, "PYTHONPATH": str(ROOT)},
        ROOT,
        upstream_port,
    )
    servers = [upstream]
    try:
        wait_answering(upstream_port, DIRECT_PATH, body(SLUG, False))
        gateways = [start_gateway("gateway", ROOT, upstream_port, gateway_cpus)]
        if args.baseline is not None:
            gateways.append(
                start_gateway("baseline", args.baseline.resolve(), upstream_port, gateway_cpus)
            )
        servers += gateways
        names = [g.name for g in gateways]
        sections: list[str] = []
        for shared, title in ((True, "one core"), (False, "client on another core")):
            # `shared`: the gateway, the upstream and this client all on the gateway's core
            if gateway_cpus is not None and others is not None:
                for server in servers:
                    home = others if server is upstream and not shared else gateway_cpus
                    repin(server.process.pid, home)
                os.sched_setaffinity(0, cpu_set(gateway_cpus if shared else others))
            for stream in (False, True):
                kind = "stream" if stream else "non-stream"
                aside = (gateway_cpus, others) if shared and gateway_cpus and others else None
                rows = sequential(upstream_port, gateways, stream, args.requests, aside)
                print(title, kind, json.dumps(rows), flush=True)
                sections += render_sequential(f"Sequential, {kind}, {title}", rows, names)
        if wrk_available():
            for stream in (False, True):
                kind = "stream" if stream else "non-stream"
                rows = concurrent(
                    upstream_port, gateways, stream, args.seconds, args.rounds, others
                )
                print(kind, json.dumps(rows), flush=True)
                title = f"{CONNECTIONS} connections, {kind}, gateway on one core"
                sections += render_concurrent(title, rows, names)
            sections += workers_case(upstream_port, args, workers_cpus, rest)
        else:
            sections.append("*wrk is not installed (`apt-get install wrk`): no concurrent cases.*")
    finally:
        for server in servers:
            server.stop()
    text = render(sections, args, layout)
    print(text)
    if not args.no_write:
        write_section(text, START, END)
        print("wrote docs/benchmarks.md")


def workers_case(
    upstream_port: int, args: argparse.Namespace, cpus: str | None, wrk_cpus: str | None
) -> list[str]:
    """`gateway serve --workers 2` against one worker, both allowed the same cores."""
    one = start_gateway("1 worker", ROOT, upstream_port, cpus)
    two = start_gateway("2 workers", ROOT, upstream_port, cpus, workers=2)
    try:
        before = two.cpu.per_pid() or {}
        rows = concurrent(upstream_port, [one, two], False, args.seconds, args.rounds, wrk_cpus)
        after = two.cpu.per_pid() or {}
    finally:
        one.stop()
        two.stop()
    print("workers", json.dumps(rows), flush=True)
    ratio = rows["2 workers"]["rps"] / rows["1 worker"]["rps"]
    title = f"`--workers 2` vs one worker, non-stream, gateway on cores {cpus}: {ratio:.2f}x"
    out = render_concurrent(title, rows, ["1 worker", "2 workers"])
    # A keep-alive connection stays with its worker: the busiest one's share bounds the scaling
    used = sorted((after[p] - before.get(p, 0.0) for p in list(after)[1:]), reverse=True)[:2]
    if len(used) == 2 and sum(used) > 0:
        share = used[0] / sum(used)
        out += [
            f"The busiest worker did {share:.0%} of the two workers' CPU work (the split of wrk's "
            f"{CONNECTIONS} connections between them): with two free cores, at most "
            f"{1 / share:.2f}x one worker.",
            "",
        ]
    return out


if __name__ == "__main__":
    main()
