"""Hostile clients on loopback, and a gateway served exactly as `gateway serve` serves it.

server = served_like_cli(app, settings)       # uvicorn + uvicorn_options(settings), a thread
socks = open_sockets(server.port, 1000)       # raw sockets, nothing sent yet
closed = wait_closed(socks, timeout_s=2)      # how many the server has closed by then
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import time
from typing import Any

import pytest
import uvicorn

from gateway.api.http_server import uvicorn_options
from tests.fakes.server import ServerThread


def served_like_cli(app: Any, settings: Any, **options_over: Any) -> ServerThread:
    """A ServerThread whose uvicorn runs with the CLI's options: the hardened protocol and its
    limits (the plain ServerThread serves uvicorn's own httptools protocol). Quiet unless
    `options_over` says otherwise (log_level="info", access_log=True)."""
    thread = ServerThread(app)
    options = uvicorn_options(settings)
    options.update(log_level="critical", access_log=False)
    options.update(options_over)
    config = uvicorn.Config(
        app, lifespan="on", interface="asgi3", timeout_graceful_shutdown=1, **options
    )
    thread.server = uvicorn.Server(config)
    return thread


def need_fds(count: int) -> None:
    """Raise this process's open-file limit to fit `count` sockets on each side, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * count + 256
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def open_sockets(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def send_all(socks: list[socket.socket], data: bytes) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.send(data)


def read_closed(sock: socket.socket, received: bytearray) -> bool:
    """Read what is there into `received`; True once the server has closed the connection."""
    while True:
        try:
            part = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:  # reset: closed by the server with our bytes unread
            return True
        if not part:
            return True
        received += part


def wait_closed(
    socks: list[socket.socket], timeout_s: float, *, tick: Any = None, tick_every_s: float = 0.0
) -> dict[int, bytes]:
    """Wait until the server closed every socket or `timeout_s` passed: {index: what it sent}
    for the closed ones. `tick(open_socks)` runs every `tick_every_s` (a client that drips)."""
    closed: dict[int, bytes] = {}
    buffers = [bytearray() for _ in socks]
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    deadline = time.monotonic() + timeout_s
    next_tick = time.monotonic() + tick_every_s
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.05):
            index = key.data
            if read_closed(socks[index], buffers[index]):
                closed[index] = bytes(buffers[index])
                selector.unregister(socks[index])
        if tick is not None and time.monotonic() >= next_tick:
            tick([s for i, s in enumerate(socks) if i not in closed])
            next_tick = time.monotonic() + tick_every_s
    selector.close()
    return closed


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def rss_bytes(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
