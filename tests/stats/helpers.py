"""Test helpers for the stats tests: a fake clock, dedicated redis-server processes on free
ports, and a fault-injecting TCP proxy that can take Redis "down" or swallow the reply to a
batch after Redis has applied it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.stats import MemoryStats, RedisStats

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
T0 = 1_700_000_100.0 + 30  # a fake "now": mid-minute, 30 s into a 15-minute bucket


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle(*stores: MemoryStats | RedisStats) -> None:
    """Persist every store's records, then reload every snapshot (no-ops in memory)."""
    for store in stores:
        await store.flush()
    for store in stores:
        await store.refresh()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of the test's own (no persistence unless stopped with save).

    `aof=True`: every write is in the append-only file before Redis answers it (appendfsync
    always), so `kill()` (SIGKILL) then `start()` on the same port and directory loses nothing
    that Redis acknowledged: a production setup's crash, without its fsync window."""

    def __init__(self, directory: Path, *, aof: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.aof = aof
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        no_retry = Retry(NoBackoff(), 0)  # a refused connection should say so at once
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2, retry=no_retry)

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--dir", str(self.directory)]
        command += (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self, *, save: bool) -> None:
        """SHUTDOWN SAVE keeps the data for the next start (a restart); NOSAVE loses it."""
        assert self.process is not None
        with contextlib.suppress(redis.ConnectionError):
            self.client().shutdown(save=save, nosave=not save)
        self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class FaultProxy:
    """TCP proxy on loopback between a store and Redis.

    down():        refuse new connections and cut the open ones (Redis "unreachable").
    swallow_reply_to(b"EVALSHA"): the next request containing that command is forwarded, its
                   reply is discarded and the proxy goes down: the write happened, the client
                   cannot know, and cannot reconnect until up()."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.is_down = False
        self.swallow_marker: bytes | None = None
        self.swallowed = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def down(self) -> None:
        self.is_down = True
        for writer in list(self._writers):
            writer.close()

    def up(self) -> None:
        self.is_down = False

    def swallow_reply_to(self, marker: bytes) -> None:
        self.swallow_marker = marker.upper()

    async def close(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        swallowing = False

        async def client_to_server() -> None:
            nonlocal swallowing
            while data := await reader.read(65536):
                if self.swallow_marker and self.swallow_marker in data.upper():
                    self.swallow_marker = None
                    swallowing = True
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if swallowing:  # Redis applied it and answered; the answer never arrives
                    self.swallowed += 1
                    self.down()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            self._writers.discard(w)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()
