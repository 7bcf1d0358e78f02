"""`python -m local_backend serve` as a user runs it: a subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_cli(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """The server's output goes to `output(process)` (a file: a pipe nobody reads could fill)."""
    command = [sys.executable, "-m", "local_backend", "serve", "--model-dir", str(folder)]
    command += ["--device", "cpu", "--port", str(port), "--max-slots", "2", "--cpu-threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - open for the process's whole life
    process = subprocess.Popen([*command, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    _logs[process.pid] = log
    return process


_logs: dict[int, Any] = {}


def output(process: subprocess.Popen[bytes]) -> str:
    log = _logs[process.pid]
    log.seek(0)
    return str(log.read().decode(errors="replace"))


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, output(process)
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the backend did not become ready")
