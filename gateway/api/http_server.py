"""How `gateway serve` runs uvicorn: its httptools protocol, with a response's writes coalesced.

    uvicorn.run(app, http=GatewayHttpProtocol, loop="uvloop", ...)   # gateway/cli.py

uvicorn writes a response's head and its body in two `transport.write` calls, so a small JSON
answer leaves as two TCP segments: two send syscalls here and two wake-ups of the client (on
loopback each send runs the receiver's TCP path and wake-up in the sender's time slice). On the
2-core machines the gateway is measured on, the second one cost about 0.1 ms per request of
gateway CPU, plus the client's second read (bench/overhead.py). `CoalescingTransport` keeps
the writes made during one step of the event loop and hands them to the socket together right
after it (`loop.call_soon`): a non-stream response (head, then body, in one task step) becomes one
write; a stream's events still leave as they are produced, one loop iteration later at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class CoalescingTransport:
    """An asyncio transport whose writes within one event-loop step reach the socket as one."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Hand what was written so far to the socket (a no-op when nothing is pending)."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():  # a closed peer: there is no one to send to
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()  # what was written before close() still goes out, as asyncio promises
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    # What uvicorn calls on every request, delegated explicitly: reaching __getattr__ costs a
    # failed lookup (an AttributeError built and dropped) each time.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        # set_protocol, get_protocol, is_reading, set_write_buffer_limits, ...
        return getattr(self._transport, name)


RECEIVED_AT = "gateway.received_at"  # scope key: perf_counter() when the request's bytes came
CONNECTION = "gateway.connection"  # scope key: the protocol, for `watch_disconnect`


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport, plus two things in each request's
    scope: when its first bytes were read (`RECEIVED_AT`: the gateway's time per request starts
    there, request parsing included) and the connection itself (`CONNECTION`), whose
    `watch_disconnect(callback)` calls back when the client hangs up — a callback from the
    connection's own `connection_lost`, instead of a task per request awaiting `receive()` for
    the disconnect message (~20 µs of CPU per request on 2 cores)."""

    _read_at = 0.0
    _gone_callbacks: list[Callable[[], None]] | None = None
    _lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._read_at = time.perf_counter()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: Any = self.scope
        scope[RECEIVED_AT] = self._read_at
        scope[CONNECTION] = self

    def watch_disconnect(self, callback: Callable[[], None]) -> bool:
        """Call `callback` once when the client hangs up; False (and no call) when it already
        has."""
        if self._lost:
            return False
        if self._gone_callbacks is None:
            self._gone_callbacks = []
        self._gone_callbacks.append(callback)
        return True

    def unwatch_disconnect(self, callback: Callable[[], None]) -> None:
        callbacks = self._gone_callbacks
        if callbacks:
            with contextlib.suppress(ValueError):
                callbacks.remove(callback)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        super().connection_lost(exc)
        callbacks, self._gone_callbacks = self._gone_callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception as error:  # one request's bug must not spare the others
                log.error("a disconnect callback failed", exc_info=error)
