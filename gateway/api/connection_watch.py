"""What each request's scope learns from its connection: when its bytes came, and hang-ups.

    RECEIVED_AT   scope key: perf_counter() when the request's first bytes were read (the
                  gateway's time per request starts there, request parsing included)
    CONNECTION    scope key: the protocol itself, a `ConnectionWatch`

`ConnectionWatch.watch_disconnect(callback)` calls back once when the client hangs up: a
callback from the connection's own `connection_lost`, instead of a task per request awaiting
`receive()` for the disconnect message (~20 µs of CPU per request on 2 cores). The protocol
(http_server.GatewayHttpProtocol) sets `_read_at` on every read, fills the two scope keys when
a request begins and calls `notify_lost()` from its `connection_lost`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

RECEIVED_AT = "gateway.received_at"
CONNECTION = "gateway.connection"


class ConnectionWatch:
    _read_at = 0.0
    _gone_callbacks: list[Callable[[], None]] | None = None
    _lost = False

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

    def notify_lost(self) -> None:
        self._lost = True
        callbacks, self._gone_callbacks = self._gone_callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception as error:  # one request's bug must not spare the others
                log.error("a disconnect callback failed", exc_info=error)
