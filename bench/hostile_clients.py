"""Hostile clients against `gateway serve`: sockets held, memory, and /livez under 1,500 streams.

    .venv/bin/python bench/hostile_clients.py                 # writes docs/reliability.md
    .venv/bin/python bench/hostile_clients.py --no-write --sockets 300

Three processes: a slow streaming upstream (this file, `--role upstream`: standard SSE, one
chunk every 0.5 s, behind all four hosted providers' base URLs, so the gateway's upstream pools
hold 4 x 256 connections), the gateway (`gateway serve` with its default server limits unless flags
override them), and this client. The same attacks also run against the gateway as uvicorn serves
it without the limits (`--role baseline`: uvicorn's own httptools protocol), side by side:

- silent / dripping / bodiless: N raw sockets that send nothing, a header line every 2 s, or
  headers with Content-Length and no body; how many are still open one second after the
  header (body) timeout;
- huge heads: 300 sockets each sending 1 MiB of unfinished headers; the gateway's RSS;
- 1,500 concurrent streams: how many were admitted / shed (503 + Retry-After), and /livez
  latency sampled every 100 ms while they run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from doc_section import write_section  # noqa: E402  (bench/ is the script's path)
from overhead import free_port  # noqa: E402


def gateway_env(upstream_port: int, port: int) -> dict[str, str]:  # one route: lepton, faked
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


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- hostile-clients:start -->", "<!-- hostile-clients:end -->"
MODEL = "wizardlm-2-8x22b"
CHUNKS, CHUNK_DELAY_S = 10, 0.5

# -- the servers ---------------------------------------------------------------------------------


async def slow_stream_app(scope: Any, receive: Any, send: Any) -> None:
    """Lepton's dialect, slowly: a role chunk, CHUNKS words CHUNK_DELAY_S apart, usage, [DONE]."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )

    def event(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "model": MODEL}
        body["choices"] = [choice] if usage is None else []
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    await send(
        {"type": "http.response.body", "body": event({"role": "assistant"}), "more_body": True}
    )
    for _ in range(CHUNKS):
        await asyncio.sleep(CHUNK_DELAY_S)
        await send(
            {"type": "http.response.body", "body": event({"content": " word"}), "more_body": True}
        )
    tail = event({}, "stop") + event({}, usage={"prompt_tokens": 5, "completion_tokens": CHUNKS})
    await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})


def serve(role: str, port: int) -> None:
    import uvicorn

    if role == "upstream":
        uvicorn.run(slow_stream_app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)
        return
    from gateway.api.app import create_app  # the baseline: no server limits at all

    uvicorn.run(
        create_app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
    )


# -- attacks -------------------------------------------------------------------------------------


def open_sockets(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many the server has not closed (reads whatever it sent)."""
    count = 0
    for sock in socks:
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def send_all(socks: list[socket.socket], data: bytes) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(data)


def held_after(port: int, count: int, first: bytes, drip: bytes | None, wait_s: float) -> int:
    socks = open_sockets(port, count)
    try:
        send_all(socks, first)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            if drip is not None:
                send_all(socks, drip)
        return still_open(socks)
    finally:
        for sock in socks:
            sock.close()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def huge_heads(port: int, pid: int, count: int) -> tuple[float, float, int]:
    """RSS before, RSS while `count` sockets have sent 1 MiB of unfinished headers, still open."""
    before = rss_mib(pid)
    socks = open_sockets(port, count)
    line = b"X-Filler: " + b"a" * 8180 + b"\r\n"
    try:
        send_all(socks, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
        selector = selectors.DefaultSelector()
        sent = dict.fromkeys(range(count), 0)
        for index, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_WRITE, index)
        deadline = time.monotonic() + 60
        while sent and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                index = key.data
                try:
                    socks[index].sendall(line)
                    sent[index] += 1
                except BlockingIOError:
                    continue  # the server is not reading right now: try again
                except OSError:  # refused and closed
                    selector.unregister(socks[index])
                    sent.pop(index)
                    continue
                if sent[index] >= 128:
                    selector.unregister(socks[index])
                    sent.pop(index)
        time.sleep(1.0)
        return before, rss_mib(pid), still_open(socks)
    finally:
        for sock in socks:
            sock.close()


def probe_livez(url: str, latencies: list[float], done: threading.Event) -> None:
    with httpx.Client(timeout=60) as probe:
        while not done.is_set():
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                probe.get(f"{url}/livez")
            latencies.append((time.perf_counter() - started) * 1000)
            done.wait(0.1)


async def streams_and_livez(url: str, streams: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one() -> None:
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    await resp.aread()
                    statuses.append(resp.status_code)
            except httpx.HTTPError:
                statuses.append(0)

        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        done = threading.Event()
        latencies: list[float] = []
        # The probe runs on its own thread: this loop is busy with the streams' client side.
        prober = threading.Thread(target=probe_livez, args=(url, latencies, done))
        prober.start()
        await asyncio.gather(*tasks)
        done.set()
        await asyncio.to_thread(prober.join)
    latencies.sort()
    others = sorted(Counter(s for s in statuses if s not in (200, 503)).items())
    return {
        "ok": statuses.count(200),
        "shed": statuses.count(503),
        "failed": len(statuses) - statuses.count(200) - statuses.count(503),
        "failed_as": ", ".join(f"{n} x {status or 'no answer'}" for status, n in others) or "-",
        "livez_p50": statistics.median(latencies),
        "livez_p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "livez_max": latencies[-1],
    }


# -- the run -------------------------------------------------------------------------------------


def start(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen([sys.executable, *argv], env=env, **quiet)
    wait_listening(port)
    return process


def attack(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    head = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n"
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{"
    wait_head, wait_body = args.header_timeout + 1, args.body_timeout + 1
    out: dict[str, Any] = {
        "silent": held_after(port, args.sockets, b"", None, wait_head),
        "dripping": held_after(port, args.sockets, head, b"X-Drip: 1\r\n", wait_head),
        "bodiless": held_after(port, args.sockets, post, None, wait_body),
    }
    out["rss_before"], out["rss_heads"], out["heads_open"] = huge_heads(port, pid, 300)
    out.update(asyncio.run(streams_and_livez(f"http://127.0.0.1:{port}", args.streams)))
    out["rss_peak"] = rss_mib(pid, "VmHWM")
    return out


def render(args: argparse.Namespace, base: dict[str, Any], ours: dict[str, Any]) -> str:
    n = args.sockets
    rows = [
        (f"{n} silent sockets, open {args.header_timeout + 1:g} s later", "silent", "{}"),
        (f"{n} sockets dripping a header line every 2 s, open then", "dripping", "{}"),
        (
            f"{n} sockets with headers and no body, open {args.body_timeout + 1:g} s later",
            "bodiless",
            "{}",
        ),
        ("RSS before the huge heads, MiB", "rss_before", "{:.0f}"),
        ("RSS with 300 x 1 MiB unfinished heads sent, MiB", "rss_heads", "{:.0f}"),
        ("of those 300 sockets, still open 1 s later", "heads_open", "{}"),
        (f"{args.streams} concurrent streams: served 200", "ok", "{}"),
        (f"{args.streams} concurrent streams: shed 503 + Retry-After", "shed", "{}"),
        (f"{args.streams} concurrent streams: failed otherwise", "failed", "{}"),
        ("... as (status)", "failed_as", "{}"),
        ("/livez during them, p50 ms", "livez_p50", "{:.1f}"),
        ("/livez during them, p99 ms", "livez_p99", "{:.1f}"),
        ("/livez during them, max ms", "livez_max", "{:.1f}"),
        ("gateway peak RSS over the whole run, MiB", "rss_peak", "{:.0f}"),
    ]
    lines = [
        START,
        "## Hostile clients",
        "",
        f"`.venv/bin/python bench/hostile_clients.py` ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, shared; gateway limits: header timeout "
        f"{args.header_timeout:g} s, body timeout {args.body_timeout:g} s, max in-flight "
        f'{args.max_inflight}, the other limits at their defaults). "without limits" is the '
        "same gateway served by uvicorn's own httptools protocol, as before issue 8.",
        "",
        "| | without limits | gateway serve |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {label} | {fmt.format(base[key])} | {fmt.format(ours[key])} |"
        for label, key, fmt in rows
    ]
    lines += [
        "",
        "Tests: `tests/gateway/test_server_limits.py` (1,000 silent / dripping / bodiless sockets "
        "closed at the timeout, 431 and bounded RSS for 300 x 1 MiB heads, 503 + Retry-After "
        "over the connection and in-flight limits with /livez and /metrics still answering).",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=1500)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--max-inflight", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--role", choices=["upstream", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:
        serve(args.role, args.port)
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it

    upstream_port = free_port()
    upstream = start(
        [__file__, "--role", "upstream", "--port", str(upstream_port)],
        {**os.environ, "PYTHONPATH": str(ROOT)},
        upstream_port,
    )
    results = {}
    try:
        for name in ("baseline", "ours"):
            port = free_port()
            env = gateway_env(upstream_port, port)
            for provider in ("novita", "openrouter", "deepinfra"):  # 4 x 256 upstream connections
                env[f"{provider.upper()}_API_KEY"] = f"sk-bench-{provider}-0123456789"
                env[f"{provider.upper()}_BASE_URL"] = (
                    f"http://127.0.0.1:{upstream_port}/{provider}/v1"
                )
            env.update(
                SERVER_HEADER_TIMEOUT_S=str(args.header_timeout),
                SERVER_BODY_TIMEOUT_S=str(args.body_timeout),
                SERVER_MAX_INFLIGHT_REQUESTS=str(args.max_inflight),
                TIMEOUT_GAP_S="30",
            )
            argv = (
                [__file__, "--role", "baseline", "--port", str(port)]
                if name == "baseline"
                else ["-c", "from gateway.cli import main; main()", "serve", "--port", str(port)]
            )
            gateway = start(argv, env, port)
            try:
                results[name] = attack(port, gateway.pid, args)
                print(name, results[name], flush=True)
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
    finally:
        upstream.terminate()
        upstream.wait(timeout=30)
    text = render(args, results["baseline"], results["ours"])
    print(text)
    if not args.no_write:
        write_section(text, START, END, DOC)


if __name__ == "__main__":
    main()
