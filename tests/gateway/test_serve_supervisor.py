"""workers.py's supervisor under `gateway serve --workers N`: each worker accepts on its own
SO_REUSEPORT socket (connections spread over all of them), a dead worker is replaced, a taken
port fails at once, and SIGTERM stops every worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.gateway.test_cli import _free_port, clean_env
from tests.gateway.test_serve_workers import ROOT, SERVE, Serve


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _sockets_on(port: int, state: str) -> set[str]:
    """Socket inodes bound to local `port` in a TCP state ("01" established, "0A" listening)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                found.add(fields[9])
    return found


def _established_to(port: int) -> set[str]:
    """Socket inodes of the server side of the established connections to `port`."""
    return _sockets_on(port, "01")


def serve_until_exit(port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """`gateway serve --workers 2` that is expected to exit by itself."""
    return subprocess.run(
        [*SERVE, "--port", str(port), "--workers", "2"],
        env=clean_env(PYTHONPATH=str(ROOT), **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_for(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_connections_spread_over_every_worker(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "--workers", "2")
    clients: list[socket.socket] = []
    try:
        serve.wait_ready()
        _wait_for(lambda: len(serve.workers()) == 2)
        for _ in range(32):  # one at a time, each answered before the next connects
            client = socket.create_connection(("127.0.0.1", serve.port))
            client.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            clients.append(client)
        accepted = _established_to(serve.port)
        held = [len(_socket_inodes(pid) & accepted) for pid in serve.workers()]
        # a fair split of 32 connections leaves each worker at least 4 of them but for ~1e-6
        assert sum(held) == 32 and min(held) >= 4, held
    finally:
        for client in clients:
            client.close()
        text = serve.stop()
    assert "Traceback" not in text


def test_each_worker_listens_on_a_socket_of_its_own(tmp_path: Path) -> None:
    """SO_REUSEPORT: one listening socket per worker, so the kernel balances between them
    (uvicorn's supervisor shares a single one, which every worker races to accept from)."""
    serve = Serve(tmp_path, "--workers", "3")
    try:
        serve.wait_ready()
        _wait_for(lambda: len(serve.workers()) == 3)
        listening = _sockets_on(serve.port, "0A")
        owned = [_socket_inodes(pid) & listening for pid in serve.workers()]
        assert [len(inodes) for inodes in owned] == [1, 1, 1], owned
        assert len(set.union(*owned)) == 3  # three different sockets
    finally:
        serve.stop()


def test_a_dead_worker_is_replaced_and_the_port_keeps_answering(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "--workers", "2")
    try:
        serve.wait_ready()
        _wait_for(lambda: len(serve.workers()) == 2)
        first = serve.workers()
        os.kill(first[0], signal.SIGKILL)
        _wait_for(lambda: len(serve.workers()) == 2 and first[0] not in serve.workers())
        assert first[1] in serve.workers()  # the other one was left alone
        for _ in range(20):  # new connections each: whichever worker takes them answers
            assert httpx.get(f"http://127.0.0.1:{serve.port}/livez", timeout=5).status_code == 200
    finally:
        serve.stop()


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "--workers", "3")
    serve.wait_ready()
    _wait_for(lambda: len(serve.workers()) == 3)
    workers = serve.workers()
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(timeout=30) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_taken_port_fails_at_once_with_a_clear_message() -> None:
    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = serve_until_exit(port)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"127.0.0.1:{port}" in output and "Traceback" not in output


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "--workers", "2")
    try:
        serve.wait_ready()
        _wait_for(lambda: len(serve.workers()) == 2)
        workers = serve.workers()
        serve.process.kill()  # SIGKILL: nothing of the supervisor's own runs
        serve.process.wait(timeout=10)

        def gone(pid: int) -> bool:
            try:
                return "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
            except OSError:
                return True

        _wait_for(lambda: all(gone(pid) for pid in workers), timeout_s=30)
        with socket.socket() as probe:  # nobody holds the port any more
            assert probe.connect_ex(("127.0.0.1", serve.port)) != 0
    finally:
        if serve.process.poll() is None:
            serve.stop()


def test_workers_that_die_at_startup_are_not_restarted_forever() -> None:
    started = time.monotonic()
    result = serve_until_exit(_free_port(), REDIS_URL="notascheme://nowhere")
    assert result.returncode != 0 and time.monotonic() - started < 30
    assert "workers keep exiting at startup" in result.stdout + result.stderr
