"""`Http1Transport`: the httpx transport the providers use — pooled HTTP/1.1 keep-alive on
asyncio, with httptools (the C parser uvicorn[standard] already brings) reading responses.

    client = httpx.AsyncClient(transport=Http1Transport(ssl_context=ctx, max_connections=256))
    response = await transport.request(origin, head, body)    # the providers: no httpx objects

Why not httpx's default transport: on the small VMs the gateway is measured on, httpcore + h11
+ anyio cost about 1 ms of CPU per upstream call — more than everything else the gateway does
for a request — and write a request's headers and body as two packets. This transport sends a
request in one write, parses the response in C and hands the body to httpx as it arrives; the
client above it (httpx.AsyncClient: requests, responses, content decoding, the exception types)
is unchanged. The providers skip even that layer: `request()` takes a request already encoded
(`request_head()` once per endpoint, plus the body) and returns an `Http1Response` (status,
raw headers, the body whole or as it arrives), because httpx's Request and Response objects
and their generator layers cost ~0.1 ms a call. Scope: what the providers need — requests with
in-memory bodies; responses framed by Content-Length, chunked encoding or the connection
closing; http and https.

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
            if timeout is None:  # the providers' case: their phase clock bounds the wait
                await self._waiter
            else:
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

    def __init__(
        self,
        pool: Http1Transport,
        conn: _Connection,
        read_timeout: float | None,
        request: httpx.Request | None,
    ):
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._request = request
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (piece := await self.next_piece()) is not None:
            yield piece

    async def next_piece(self) -> bytes | None:
        """The bytes received since the last call (waiting for some), None after the end."""
        conn = self._conn
        while True:
            if conn.body:
                return conn.take_body()
            if conn.done:
                await self.aclose()
                return None
            await self._wait_more()

    @property
    def complete(self) -> bool:
        return self._conn.done

    @property
    def ready(self) -> bool:
        return bool(self._conn.body) or self._conn.done

    async def read(self) -> bytes:
        """The whole body (usually already here: then no generator, no wait)."""
        conn = self._conn
        if conn.done:
            data = conn.take_body() if conn.body else b""
            await self.aclose()
            return data
        return b"".join([part async for part in self])

    async def _wait_more(self) -> None:
        conn = self._conn
        if conn.error is not None:
            raise conn.error
        if conn.closed:
            if conn.framed:
                raise httpx.RemoteProtocolError(
                    "the server closed the connection before the body ended",
                    request=self._request,
                )
            conn.done = True  # a body delimited by the connection closing
            return
        try:
            await conn.wait(self._read_timeout)
        except TimeoutError:
            raise httpx.ReadTimeout("timed out reading the body", request=self._request) from None

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._conn)


class Http1Response:
    """What `Http1Transport.request` returns: status, raw headers, and the body.

    The body is read once, whole (`aread`) or as it arrives (`aiter_bytes`); `aclose()` before
    its end drops the connection. A body the upstream compressed (we ask for identity, but it
    may not listen) is decoded by httpx's own decoders, as the httpx interface would."""

    __slots__ = ("_body", "_decoded", "_pieces", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: _Body):
        self.status = status
        self.headers = headers
        self._body = body
        self._decoded: httpx.Response | None = None
        self._pieces: AsyncIterator[bytes] | None = None  # decoded body, as it is read
        encoding = self.header(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            self._decoded = httpx.Response(status, headers=headers, stream=body)

    @property
    def complete(self) -> bool:
        """The whole body is here: `aread()` returns without waiting."""
        return self._decoded is None and self._body.complete

    def header(self, name: bytes) -> str | None:
        """The first value of a header (`name` in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    async def aread(self) -> bytes:
        if self._decoded is not None:
            return await self._decoded.aread()
        return await self._body.read()

    @property
    def ready(self) -> bool:
        """`next_bytes()` returns without waiting (bytes are here, or the end is)."""
        return self._decoded is None and self._body.ready

    async def next_bytes(self) -> bytes | None:
        """The body's next bytes as they arrive; None at its end."""
        if self._decoded is None:
            return await self._body.next_piece()
        if self._pieces is None:
            self._pieces = self._decoded.aiter_bytes()
        return await anext(self._pieces, None)

    async def aclose(self) -> None:
        await self._body.aclose()


def request_head(method: str, url: httpx.URL, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request's line and headers, `Host` first, without Content-Length or the blank line:
    `request()` callers add `content-length: N\r\n\r\n` and the body."""
    head = [method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    if not any(name.lower() == b"host" for name, _ in headers):
        head += [b"Host: ", url.netloc, b"\r\n"]
    for name, value in headers:
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            head += [name, b": ", value, b"\r\n"]
    return b"".join(head)


def origin_of(url: httpx.URL) -> Origin:
    scheme = url.raw_scheme
    if scheme not in _PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
    return (scheme, url.host, url.port or _PORTS[scheme])


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

    async def request(
        self,
        origin: Origin,
        head: bytes,
        body: bytes,
        *,
        pool_timeout: float | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Http1Response:
        """Send `head` (line and headers, ending in the blank line; see `request_head`) and
        `body`; the response once its head has arrived. Raises httpx's exception types."""
        conn = await self._open(
            origin, head + body, pool_timeout, connect_timeout, read_timeout, None
        )
        return Http1Response(conn.status, conn.headers, _Body(self, conn, read_timeout, None))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(
                f"unsupported scheme {url.raw_scheme!r}", request=request
            )
        body = await request.aread()
        head = request_head(request.method, url, request.headers.raw)
        if body or request.method not in ("GET", "HEAD"):
            head += b"content-length: %d\r\n" % len(body)
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        conn = await self._open(
            origin_of(url),
            head + b"\r\n" + body,
            timeouts.get("pool"),
            timeouts.get("connect"),
            read_timeout,
            request,
        )
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, read_timeout, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _open(
        self,
        origin: Origin,
        data: bytes,
        pool_timeout: float | None,
        connect_timeout: float | None,
        read_timeout: float | None,
        request: httpx.Request | None,
    ) -> _Connection:
        """Send the encoded request on a pooled (else new) connection; the connection once the
        response head is in. Holds one of the pool's slots until the body is released."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        if self._slots.locked():  # only then can acquiring wait, and need a timeout
            try:
                async with asyncio.timeout(pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no free connection", request=request) from None
        else:
            await self._slots.acquire()
        conn: _Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is not None and not await self._exchange(conn, data, read_timeout, request):
                # The server closed this pooled connection as we reused it (its keep-alive
                # timeout): nothing of the request was answered, so ask once more, afresh.
                conn.close()
                conn = None
            if conn is None:
                conn = await self._connect(origin, connect_timeout, request)
                if not await self._exchange(conn, data, read_timeout, request):
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection without a response", request=request
                    )
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        data: bytes,
        read_timeout: float | None,
        request: httpx.Request | None,
    ) -> bool:
        """Send the request and wait for the response head; False when the server closed the
        connection without sending a single byte back."""
        if conn.closed or conn.transport.is_closing():
            return False
        conn.transport.write(data)  # one write: one packet for small requests
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
                await conn.wait(read_timeout)
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
        self, origin: Origin, timeout: float | None, request: httpx.Request | None
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
