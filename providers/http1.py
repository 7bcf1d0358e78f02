"""`Http1Transport`: the httpx transport the providers use — pooled HTTP/1.1 keep-alive on
asyncio, with httptools (the C parser uvicorn[standard] already brings) reading responses.

    client = httpx.AsyncClient(transport=Http1Transport(ssl_context=ctx, max_connections=256))

Why not httpx's default transport: on the small VMs the gateway is measured on, httpcore + h11
+ anyio cost about 1 ms of CPU per upstream call — more than everything else the gateway does
for a request — and write a request's headers and body as two packets. This transport sends a
request in one write, parses the response in C and hands the body to httpx as it arrives; the
client above it (httpx.AsyncClient: requests, responses, content decoding, the exception types)
is unchanged. Scope: what the providers need — requests with in-memory bodies; responses framed
by Content-Length, chunked encoding or the connection closing; http and https.

Pooling: idle keep-alive connections are reused per origin (scheme, host, port) for
`keepalive_expiry` seconds; one the server has closed is never reused. `max_connections` bounds
the connections one transport has open; a request waits for a free one up to the pool timeout.
A response closed before its end closes its connection (so the upstream sees the hang-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

Origin = tuple[bytes, str, int]
_HIGH_WATER = 1 << 20  # unread body bytes before the socket stops reading
_PORTS = {b"http": 80, b"https": 443}


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a socket, a response parser, and the body received so far."""

    def __init__(self, origin: Origin):
        self.origin = origin
        self.transport: Any = None
        self.closed = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.persistent = False
        self.received = False  # any byte of this exchange's response
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.framed = False  # Content-Length or chunked: the end is in the bytes, not the close

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {exc}")
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.headers = []  # an interim response (100 Continue): the real one follows
            return
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True
            self.persistent = self.parser.should_keep_alive()  # only valid until the next byte

    # -- used by the transport ----------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    def take_body(self) -> bytes:
        data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def reusable(self, now: float, expiry: float) -> bool:
        return (
            not self.closed
            and self.error is None
            and not self.transport.is_closing()
            and now - self.idle_since < expiry
        )

    def keep_alive(self) -> bool:
        return self.done and self.persistent and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; closing it early drops the connection."""

    def __init__(self, pool: Http1Transport, conn: _Connection, request: httpx.Request):
        self._pool = pool
        self._conn = conn
        self._request = request
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        read_timeout = self._request.extensions.get("timeout", {}).get("read")
        while True:
            if conn.body:
                yield conn.take_body()
            elif conn.done:
                break
            elif conn.error is not None:
                raise conn.error
            elif conn.closed:
                if conn.framed:
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection before the body ended",
                        request=self._request,
                    )
                break  # a body delimited by the connection closing
            else:
                try:
                    await conn.wait(read_timeout)
                except TimeoutError:
                    raise httpx.ReadTimeout(
                        "timed out reading the body", request=self._request
                    ) from None
        await self.aclose()

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._conn)


class Http1Transport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 256,
        keepalive_expiry: float = 30.0,
    ):
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        origin: Origin = (scheme, url.host, url.port or _PORTS[scheme])
        timeouts = request.extensions.get("timeout", {})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection", request=request) from None
        conn: _Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is not None and not await self._exchange(conn, request, timeouts):
                # The server closed this pooled connection as we reused it (its keep-alive
                # timeout): nothing of the request was answered, so ask once more, afresh.
                conn.close()
                conn = None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"), request)
                if not await self._exchange(conn, request, timeouts):
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection without a response", request=request
                    )
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _exchange(
        self, conn: _Connection, request: httpx.Request, timeouts: dict[str, Any]
    ) -> bool:
        """Send the request and wait for the response head; False when the server closed the
        connection without sending a single byte back."""
        if conn.closed or conn.transport.is_closing():
            return False
        await self._send(conn, request)
        while not conn.head_done:
            if conn.error is not None:
                raise conn.error
            if conn.closed:
                if conn.received:
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection mid-response", request=request
                    )
                return False
            try:
                await conn.wait(timeouts.get("read"))
            except TimeoutError:
                raise httpx.ReadTimeout(
                    "timed out waiting for the response", request=request
                ) from None
        return True

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable(now, self._expiry):
                conn._reset()
                return conn
            conn.close()
        return None

    async def _connect(
        self, origin: Origin, timeout: float | None, request: httpx.Request
    ) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if scheme == b"https":
            tls = {"ssl": self._ssl or ssl.create_default_context(), "server_hostname": host}
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin), host, port, **tls
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting", request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(
                f"connection failed: {type(exc).__name__}", request=request
            ) from None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:  # small writes must leave at once (asyncio sets it; be sure)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    @staticmethod
    async def _send(conn: _Connection, request: httpx.Request) -> None:
        body = await request.aread()
        head = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower in (b"content-length", b"transfer-encoding"):
                continue
            head += [name, b": ", value, b"\r\n"]
        if body or request.method not in ("GET", "HEAD"):
            head += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        head.append(b"\r\n")
        conn.transport.write(b"".join(head) + body)  # one write: one packet for small requests

    def release(self, conn: _Connection) -> None:
        """The response is over: pool the connection when it can carry another request."""
        if self._slots is not None:
            self._slots.release()
        if conn.keep_alive() and not conn.body:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        self._idle.clear()
