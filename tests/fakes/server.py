"""Serving test ASGI apps for real: uvicorn on 127.0.0.1 in a thread, plus raw ASGI helpers.

server = ServerThread(app).start()     # server.url, server.port
server.call(coro)                      # run a coroutine on the server's event loop
server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn


async def read_body(receive: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def send_json(
    send: Any, status: int, data: Any, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


def free_port() -> int:
    """A port nothing listens on (bound once, then released): connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 (a real socket) in a background thread."""

    def __init__(self, app: Any, *, log_level: str = "critical", http: Any = "httptools"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            http=http,
            interface="asgi3",
            timeout_graceful_shutdown=1,
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            self.loop = runner.get_loop()
            runner.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.005)
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        """Run a coroutine on the server's event loop (stores bound to it live there)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, wait: bool = True) -> None:
        """Ask the server to exit; uvicorn takes ~0.2 s to notice, so callers may not wait."""
        self.server.should_exit = True
        if wait:
            self.join()

    def join(self) -> None:
        self.thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.close()
