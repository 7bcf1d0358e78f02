"""How `gateway serve` runs uvicorn: its httptools protocol, with a response's writes coalesced.

    uvicorn.run(app, http=GatewayHttpProtocol, loop="uvloop", ...)   # gateway/cli/serve.py

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
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, set_protocol, ...
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport; everything else unchanged."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
