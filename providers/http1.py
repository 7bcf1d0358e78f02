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

Limits: `max_header_bytes` per response head; `request(max_body_bytes=, max_decoded_bytes=)`
per exchange (http1_connection.py). Going over one raises `UpstreamLimitExceeded` and drops
the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Any

import httpx

from providers.http1_connection import (
    DEFAULT_MAX_HEADER_BYTES,
    Connection,
    Http1Response,
    Origin,
    ResponseBody,
)
from providers.http1_decode import UpstreamLimitExceeded
from providers.upstream_wait import add_blocked

__all__ = [
    "Http1Response",
    "Http1Transport",
    "Origin",
    "UpstreamLimitExceeded",
    "origin_of",
    "request_head",
]

_PORTS = {b"http": 80, b"https": 443}


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
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ):
        self._max_header_bytes = max_header_bytes
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._idle: dict[Origin, list[Connection]] = {}
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
        max_body_bytes: int | None = None,
        max_decoded_bytes: int | None = None,
    ) -> Http1Response:
        """Send `head` (line and headers, ending in the blank line; see `request_head`) and
        `body`; the response once its head has arrived. Raises httpx's exception types, and
        UpstreamLimitExceeded past a limit."""
        conn = await self._open(
            origin, head + body, pool_timeout, connect_timeout, read_timeout, None, max_body_bytes
        )
        stream = ResponseBody(self, conn, read_timeout, None)
        return Http1Response(conn.status, conn.headers, stream, max_decoded_bytes)

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
            stream=ResponseBody(self, conn, read_timeout, request),
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
        max_body_bytes: int | None = None,
    ) -> Connection:
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
        conn: Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is not None:
                conn.max_body = max_body_bytes
            if conn is not None and not await self._exchange(conn, data, read_timeout, request):
                # The server closed this pooled connection as we reused it (its keep-alive
                # timeout): nothing of the request was answered, so ask once more, afresh.
                conn.close()
                conn = None
            if conn is None:
                conn = await self._connect(origin, connect_timeout, request)
                conn.max_body = max_body_bytes
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
        conn: Connection,
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

    def _take_idle(self, origin: Origin) -> Connection | None:
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
    ) -> Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if scheme == b"https":
            tls = {"ssl": self._ssl or ssl.create_default_context(), "server_hostname": host}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(origin, self._max_header_bytes), host, port, **tls
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting", request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(
                f"connection failed: {type(exc).__name__}", request=request
            ) from None
        finally:
            add_blocked(time.perf_counter() - started)  # the upstream's accept (and TLS)
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:  # small writes must leave at once (asyncio sets it; be sure)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def release(self, conn: Connection) -> None:
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
