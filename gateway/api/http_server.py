"""How `gateway serve` runs uvicorn: its httptools protocol, hardened, with writes coalesced.

    uvicorn.run(app, host=..., port=..., **uvicorn_options(settings))   # gateway/cli/serve.py

`GatewayHttpProtocol` enforces `ServerLimits` (server_limits.py: header and body read timeouts,
header size and count, open connections and in-flight requests per process, with 408 / 431 /
503 + Retry-After answers). uvicorn alone holds a socket that sends nothing, or drips a header
line every few seconds, forever, and lets an unfinished head grow without bound; its own
`limit_concurrency` counts idle sockets as load and answers in plain text without Retry-After.

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
import functools
import logging
import resource
import time
from collections import Counter
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.api.connection_watch import CONNECTION, RECEIVED_AT, ConnectionWatch
from gateway.api.server_limits import NEVER_SHED, ServerLimits, raw_response, shed_app

# What the limits did in this process (all servers in it): /metrics shows them.
SERVER_EVENTS: Counter[str] = Counter()
SERVER_EVENT_NAMES = (
    "header_timeout",
    "body_timeout",
    "head_too_large",
    "connection_refused",
    "request_shed",
)

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


_LIVEZ_BODY = b'{"status":"ok"}'
LIVEZ_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_LIVEZ_BODY), _LIVEZ_BODY)
)
LIVEZ_RESPONSE_CLOSE = LIVEZ_RESPONSE.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


class _HeadRejected(Exception):
    """Raised from a parser callback to stop parsing a head that broke a limit."""


class GatewayHttpProtocol(ConnectionWatch, HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport, with `ServerLimits` enforced.

    One timer per connection, armed only while the server waits on the client: "head" from the
    connection's start (or a keep-alive request's first byte) until its headers are in, "body"
    from then until the body is in. It is set once per phase, so dripping bytes never extend it;
    a request whose head and body arrive in one read never arms it at all."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits if limits is not None else ServerLimits()
        self._real_app = self.app
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase = ""
        self._in_head = False
        self._in_body = False
        self._head_bytes = 0
        self._counting = False
        self._head_counted = False
        self._rejection: bytes | None = None
        self._livez = False

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._out = CoalescingTransport(transport, self.loop)
        super().connection_made(self._out)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            SERVER_EVENTS["connection_refused"] += 1
            retry = self.limits.retry_after_s
            message = f"the gateway has too many open connections; retry after {retry} s"
            self.transport.write(raw_response(503, message, retry_after=retry))
            self.transport.close()
            return
        self._arm("head", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._lost = True  # before uvicorn's own close: no watch may be added from here on
        super().connection_lost(exc)
        self.notify_lost()  # the requests watching for a hang-up (connection_watch.py)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, plus the head-size check on every read and the timers.
        self._read_at = time.perf_counter()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        self._counting = self._in_head or cycle is None or cycle.response_complete
        if self._counting:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._rejection is None:
                self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.transport.is_closing():
            self._disarm()
        elif self._in_body:
            self._arm("body", self.limits.body_timeout_s)
        elif self._in_head or self._idle():
            # An unfinished head: its bytes and fields so far (a finished one was checked exactly
            # in on_headers_complete), so it never grows past the limits by more than one read.
            if self._head_bytes > self.limits.max_header_bytes or (
                self._in_head and len(self.headers) > self.limits.max_header_count
            ):
                self._reject_head("request line and headers")
                self.send_400_response("")
            else:
                self._arm("head", self.limits.header_timeout_s)
        else:
            self._disarm()  # the request is the app's now; the response is on its way

    def send_400_response(self, msg: str) -> None:
        if self._rejection is None:
            super().send_400_response(msg)
            return
        self.transport.write(self._rejection)
        self.transport.close()
        self._disarm()

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: Any = self.scope
        scope[RECEIVED_AT] = self._read_at
        scope[CONNECTION] = self
        self._in_head = True
        self._head_counted = self._counting  # every byte of this head is in _head_bytes

    def on_headers_complete(self) -> None:
        self._in_head = False
        limits = self.limits
        if len(self.headers) > limits.max_header_count:
            self._reject_head(f"more than {limits.max_header_count} header fields")
            raise _HeadRejected()
        # The bytes read since the head began bound its size; count exactly only above the limit
        # (a body in the same read) or for a head that began inside another request's read.
        if not self._head_counted or self._head_bytes > limits.max_header_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limits.max_header_bytes:
                self._reject_head("request line and headers")
                raise _HeadRejected()
        self._head_bytes = 0
        self._in_body = True  # until on_message_complete, which follows at once without a body
        self._disarm()
        if self.url == b"/livez" and self._idle() and self.parser.get_method() == b"GET":
            self._livez = True  # answered by on_message_complete: no task, no app
            return
        if len(self.tasks) >= self.limits.max_inflight_requests and not self._never_shed():
            SERVER_EVENTS["request_shed"] += 1
            self.app = shed_app(self.limits.retry_after_s)  # uvicorn reads self.app just now
            try:
                super().on_headers_complete()
            finally:
                self.app = self._real_app
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._livez:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._livez:
            self._livez = False
            self._answer_livez()
            return
        super().on_message_complete()

    def _answer_livez(self) -> None:
        """/livez from the protocol itself, in the read callback that completed the request: a
        loaded loop answers it in one turn instead of queueing a task behind every other
        request's (under a burst of 1,500 requests, one turn of those tasks takes ~1 s here).
        Its answer is the app's own /livez: the process and its event loop respond."""
        keep_alive = self.parser.should_keep_alive()
        self._out.write(LIVEZ_RESPONSE if keep_alive else LIVEZ_RESPONSE_CLOSE)
        self._out.flush()  # now, not a loop turn later
        if keep_alive:
            self.on_response_complete()  # keep-alive timer, next request
        else:
            self.transport.close()

    # -- limits ----------------------------------------------------------------------------

    def _idle(self) -> bool:
        """No request is being served: what arrives now is (the start of) the next head."""
        return self.cycle is None or self.cycle.response_complete

    def _never_shed(self) -> bool:
        try:
            return httptools.parse_url(self.url).path in NEVER_SHED
        except httptools.HttpParserInvalidURLError:
            return False

    def _reject_head(self, what: str) -> None:
        SERVER_EVENTS["head_too_large"] += 1
        limit = self.limits.max_header_bytes
        message = f"{what} over the limit ({limit} bytes, {self.limits.max_header_count} fields)"
        self._rejection = raw_response(431, message)

    def _arm(self, phase: str, timeout_s: float) -> None:
        if self._timer is not None:
            if self._timer_phase == phase:
                return  # the deadline was set when the phase began; new bytes don't move it
            self._timer.cancel()
        self._timer_phase = phase
        self._timer = self.loop.call_later(timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_phase = ""

    def _read_timed_out(self) -> None:
        phase, self._timer, self._timer_phase = self._timer_phase, None, ""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if phase == "body":
            if self.flow.read_paused:  # the app has not taken what it has: not the client's fault
                self._arm("body", self.limits.body_timeout_s)
                return
            SERVER_EVENTS["body_timeout"] += 1
            if cycle is not None and not cycle.response_started:
                message = f"the request body did not arrive within {self.limits.body_timeout_s} s"
                self.transport.write(raw_response(408, message))
            if cycle is not None:
                cycle.disconnected = True  # the app's reads see a disconnect, its writes go nowhere
                cycle.message_event.set()
        else:
            SERVER_EVENTS["header_timeout"] += 1
            if self._in_head:
                limit = self.limits.header_timeout_s
                message = f"the request headers did not arrive within {limit} s"
                self.transport.write(raw_response(408, message))
        self.transport.close()


def protocol_factory(limits: ServerLimits) -> Any:
    """What uvicorn's `http=` takes: our protocol with these limits (a partial pickles, so it also
    works with uvicorn's worker processes)."""
    return functools.partial(GatewayHttpProtocol, limits=limits)


# File descriptors beyond the client connections: upstream pools (256 per provider), Redis, logs.
FD_RESERVE = 2048


def ensure_open_files(limits: ServerLimits) -> int:
    """Raise this process's soft open-file limit toward what `max_connections` needs (up to the
    hard limit) and return it. Below it, accept() fails with EMFILE before the connection limit
    can answer 503: a warning says which setting to lower or which limit to raise."""
    needed = limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d is below server_max_connections %d + %d for upstreams: "
            "raise `ulimit -n` or lower SERVER_MAX_CONNECTIONS",
            soft,
            limits.max_connections,
            FD_RESERVE,
        )
    return int(soft)


def access_log_enabled(log_level: str) -> bool:
    return log_level.lower() in ("info", "debug", "trace")


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments for the gateway (besides app, host, port);
    raises the open-file limit the server limits need (ensure_open_files)."""
    limits = ServerLimits.from_settings(settings)
    ensure_open_files(limits)
    return {
        "http": protocol_factory(limits),
        "timeout_keep_alive": limits.keepalive_timeout_s,
        "log_level": settings.log_level,
        # uvicorn builds every access-log line's arguments before the logger checks its level:
        # when the level hides INFO, nothing would be written, so leave the work undone.
        "access_log": access_log_enabled(settings.log_level),
        "backlog": max(2048, limits.max_connections),
    }
