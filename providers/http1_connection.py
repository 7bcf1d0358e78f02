"""One pooled HTTP/1.1 connection of `Http1Transport` (http1.py), and the response it hands out.

Connection      the asyncio protocol: the socket, httptools parsing the response, the body
                bytes received so far; `wait()` until more arrives
ResponseBody    the body as it arrives (also httpx's stream for the httpx interface);
                finishing or closing it gives the connection back to the pool
Http1Response   what `Http1Transport.request()` returns: status, raw headers, the body whole
                (`aread`) or piece by piece (`next_bytes`)

Limits (what an upstream may make us hold): the status line and headers together
(`max_header_bytes`, checked as bytes arrive, before the parser has kept them), the body's raw
bytes (`max_body`, per exchange; None for an event stream, whose lines the SSE decoder bounds)
and, for a compressed body, its decoded size (http1_decode.py). Going over one is
`UpstreamLimitExceeded`: the connection is closed at once, nothing more is read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httptools
import httpx

from providers.http1_decode import BoundedDecoder, UpstreamLimitExceeded
from providers.upstream_wait import add_blocked

Origin = tuple[bytes, str, int]
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
_HIGH_WATER = 1 << 20  # unread body bytes before the socket stops reading


class Pool(Protocol):
    def release(self, conn: Connection) -> None:
        """The response is over: keep the connection for another request, or close it."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a socket, a response parser, and the body received so far."""

    def __init__(self, origin: Origin, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.origin = origin
        self.max_header_bytes = max_header_bytes
        self.max_body: int | None = None  # raw body bytes this exchange may receive
        self.transport: Any = None
        self.closed = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._woke_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.persistent = False
        self.received = False  # any byte of this exchange's response
        self.head_bytes = 0  # bytes fed to the parser before the head was complete
        self.header_size = 0  # bytes of the headers parsed so far
        self.body_bytes = 0
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.framed = False  # Content-Length or chunked: the end is in the bytes, not the close

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.error is not None:
            return  # over a limit or malformed: the connection is closing, ignore the rest
        head = not self.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed HTTP response: {exc}")
            self.transport.close()
        if head:
            # A head still arriving counts every byte fed; a complete one, what it parsed to.
            size = self.header_size if self.head_done else self.head_bytes + len(data)
            self.head_bytes = size
            if size > self.max_header_bytes and self.error is None:
                self._fail(f"response headers over {self.max_header_bytes} bytes")
        self._wake()

    def _fail(self, why: str) -> None:
        self.error = UpstreamLimitExceeded(why)
        self.closed = True
        self.transport.close()

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
        self.header_size += len(name) + len(value) + 4  # ": " and CRLF
        lower = name.lower()
        if lower == b"content-length" or (
            lower == b"transfer-encoding" and value.lower().find(b"chunked") >= 0
        ):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.headers = []  # an interim response (100 Continue): the real one follows
            return
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if self.error is not None:
            return
        self.body_bytes += len(body)
        if self.max_body is not None and self.body_bytes > self.max_body:
            self.body.clear()
            self._fail(f"response body over {self.max_body} bytes")
            return
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
            self._woke_at = time.perf_counter()  # when the bytes arrived (upstream_wait.py)
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until more of the response arrives (or the connection ends). The wait, up to the
        arrival, is counted as the request's time blocked on its upstream."""
        self._waiter = asyncio.get_running_loop().create_future()
        self._woke_at = 0.0
        started = time.perf_counter()
        try:
            if timeout is None:  # the providers' case: their phase clock bounds the wait
                await self._waiter
            else:
                async with asyncio.timeout(timeout):
                    await self._waiter
        finally:
            self._waiter = None
            add_blocked((self._woke_at or time.perf_counter()) - started)

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


class ResponseBody(httpx.AsyncByteStream):
    """A response body as it arrives; closing it early drops the connection."""

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
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

    def unlimit(self) -> None:
        """No raw size limit from now on (an event stream: its lines are bounded instead)."""
        self._conn.max_body = None

    async def next_piece(self) -> bytes | None:
        """The bytes received since the last call (waiting for some), None after the end."""
        conn = self._conn
        while True:
            if conn.error is not None:
                raise conn.error
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
        if conn.error is not None:
            raise conn.error
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

    The body is read once, whole (`aread`) or as it arrives (`next_bytes`); `aclose()` before
    its end drops the connection. A body the upstream compressed (we ask for identity, but it
    may not listen) is decoded here, gzip or deflate only, never beyond `max_decoded` bytes
    (http1_decode.py): a 0.5 MB gzip bomb is an error after `max_decoded`, not 500 MB."""

    __slots__ = ("_body", "_decoder", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: ResponseBody,
        max_decoded: int | None = None,
    ):
        self.status = status
        self.headers = headers
        self._body = body
        self._decoder: BoundedDecoder | None = None
        encoding = self.header(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            self._decoder = BoundedDecoder(encoding, max_decoded)

    @property
    def complete(self) -> bool:
        """The whole body is here: `aread()` returns without waiting."""
        return self._body.complete

    def header(self, name: bytes) -> str | None:
        """The first value of a header (`name` in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def unlimit(self) -> None:
        """Lift the raw body limit (an event stream); a decoded-size limit stays."""
        self._body.unlimit()

    async def aread(self) -> bytes:
        raw = await self._body.read()
        if self._decoder is None:
            return raw
        return self._decoder.decode(raw) + self._decoder.flush()

    @property
    def ready(self) -> bool:
        """`next_bytes()` returns without waiting (bytes are here, or the end is)."""
        return self._body.ready

    async def next_bytes(self) -> bytes | None:
        """The body's next bytes as they arrive (maybe b"" while a decoder buffers); None at
        its end."""
        piece = await self._body.next_piece()
        if self._decoder is None:
            return piece
        if piece is None:
            return self._decoder.flush() or None
        return self._decoder.decode(piece)

    async def aclose(self) -> None:
        await self._body.aclose()
