"""Load generators that cost the measured servers as little as possible: a raw-socket client for
sequential latency and `wrk` for throughput, plus CPU accounting and core pinning.

    client = RawClient(port)                          # one keep-alive connection, no HTTP library
    timing = client.post(path, body)                  # Timing(first_byte_s, total_s, headers)
    result = run_wrk(url, body, connections=64, seconds=10, cpus="1")   # requests/s, latency
    cpu = ProcessCPU(pid, children=True)              # user + system seconds of a process tree

The raw client sends pre-encoded bytes with one `sendall` and reads with `recv` until the
response is complete (Content-Length or the chunked terminator): a few µs of Python per
request, against ~100 µs for an httpx request, so on a 2-core machine it does not steal the
gateway's core. `wrk` (C, epoll; `apt-get install wrk`) drives the concurrent cases.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Timing:
    first_byte_s: float  # request sent -> the first bytes of the response
    total_s: float  # request sent -> the last byte
    head: bytes  # status line and headers


def encode_post(host: str, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class RawClient:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host = host
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def post(self, path: str, body: bytes) -> Timing:
        return self.send(encode_post(self.host, path, body))

    def send(self, request: bytes) -> Timing:
        sock = self.sock
        started = time.perf_counter()
        sock.sendall(request)
        data = sock.recv(65536)
        first = time.perf_counter() - started
        if not data:
            raise ConnectionError("the server closed the connection")
        while b"\r\n\r\n" not in data:
            data += self._more()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = _content_length(head)
        if length is not None:
            while len(rest) < length:
                rest += self._more()
        else:  # chunked: until the last chunk
            while not rest.endswith(b"0\r\n\r\n"):
                rest += self._more()
        return Timing(first, time.perf_counter() - started, head)

    def _more(self) -> bytes:
        more = self.sock.recv(65536)
        if not more:
            raise ConnectionError("the server closed the connection mid-response")
        return more


def _content_length(head: bytes) -> int | None:
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    return int(match.group(1)) if match else None


def header(head: bytes, name: str) -> str | None:
    match = re.search(rb"\r\n" + name.encode() + rb":\s*([^\r]*)", head, re.IGNORECASE)
    return match.group(1).decode() if match else None


def status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


# -- wrk ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, body: bytes, *, connections: int, seconds: float, cpus: str | None
) -> WrkResult:
    """POST `body` to `url` from `connections` keep-alive connections, one wrk thread (pinned to
    `cpus` with taskset when given)."""
    script = (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {_lua_string(body)}\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        duration = f"-d{max(1, round(seconds))}s"
        command = ["wrk", "-t1", f"-c{connections}", duration, "--latency", "-s", path, url]
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: .*?(\d+)"):
        found = re.search(pattern, out)
        errors += int(found.group(1)) if found else 0
    return WrkResult(requests, rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), errors)


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def _wrk_ms(out: str, quantile: str) -> float:
    match = re.search(rf"^\s*{re.escape(quantile)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


# -- CPU time and pinning ------------------------------------------------------------------------


class ProcessCPU:
    """CPU seconds (user + system) a process (and, with `children`, its child processes: the
    workers of `gateway serve --workers N`) has used so far; None where /proc is missing."""

    def __init__(self, pid: int, children: bool = False):
        self.pid = pid
        self.children = children
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def pids(self) -> list[int]:
        found = [self.pid]
        if self.children:
            for task in Path(f"/proc/{self.pid}/task").glob("*"):
                try:
                    found += [int(p) for p in (task / "children").read_text().split()]
                except OSError:
                    continue
        return found

    def seconds(self) -> float | None:
        per_pid = self.per_pid()
        return None if per_pid is None else sum(per_pid.values())

    def per_pid(self) -> dict[int, float] | None:
        """CPU seconds of each process (the first: the one given; then its children)."""
        found: dict[int, float] = {}
        try:
            for pid in self.pids():
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                found[pid] = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        except (OSError, IndexError):
            return None
        return found


def pin(cpus: str | None) -> list[str]:
    """A command prefix that runs a process on `cpus` ("0", "1", "0,1"); none without taskset."""
    if cpus is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


def cpu_set(cpus: str) -> set[int]:
    """ "0", "1-3", "0,2" -> {0}, {1, 2, 3}, {0, 2}."""
    found: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def repin(pid: int, cpus: str) -> None:
    """Move a running process, every thread of it, onto `cpus` (taskset -a -p)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpu_set(cpus))
