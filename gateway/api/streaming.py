"""ASGI plumbing that ties an upstream call's life to the client connection.

    watch = DisconnectWatch(receive, scope)     # once the request body has been read
    served = await watch.run(dispatcher.complete(plan, body, ctx))    # ClientGone on hang-up
    guard = await watch.run(dispatcher.open_stream(plan, body, ctx))
    return GuardedStreamResponse(guard, headers, watch)               # takes the watch over

Under `gateway serve` the connection calls the watch back when the client hangs up
(http_server.py: a callback from `connection_lost`, no task); under any other ASGI server one
watcher task per request listens for the disconnect message (creating, starting and cancelling
it costs ~20 µs of CPU on the 2-core machines the gateway is measured on; `close()` cancels it
from the loop's queue, behind the response's write). While the request's own task is awaiting
upstream work (`run`) or sending a stream (`GuardedStreamResponse`), a hang-up cancels that
task, which closes the upstream connection; otherwise it is only noted. `GuardedStreamResponse`
sends a StreamGuard's events in the request's task and always closes the guard afterwards, so
the upstream call ends and usage is recorded exactly once however the response ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.types import Receive, Scope, Send

from gateway.api.connection_watch import CONNECTION
from gateway.dispatch import StreamGuard
from gateway.errors import GatewayError, stream_error_event

log = logging.getLogger(__name__)
T = TypeVar("T")

_HEAD = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not hold the events back
]


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """Cancels the request's task when the client hangs up while the task is `armed`."""

    __slots__ = ("_conn", "_fired", "_loop", "_task", "_watcher", "armed", "gone")

    def __init__(self, receive: Receive, scope: Scope | None = None):
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.armed = False
        self.gone = False
        self._fired = False  # this watch cancelled the task, and that is not yet consumed
        self._loop = asyncio.get_running_loop()
        self._watcher: asyncio.Task[None] | None = None
        # `gateway serve`'s protocol calls back when the connection is lost: no task needed.
        self._conn = scope.get(CONNECTION) if scope is not None else None
        if self._conn is not None:
            if not self._conn.watch_disconnect(self._on_gone):
                self.gone = True
        else:  # any other ASGI server: a task listens for the disconnect message
            self._watcher = self._loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await _wait_for_disconnect(receive)
        self._on_gone()

    def _on_gone(self) -> None:
        self.gone = True
        if self.armed:
            self.armed = False
            self._fired = True
            self._task.cancel()

    def caught(self) -> bool:
        """In an `except CancelledError`: True when the hang-up caused it (then consumed)."""
        self.armed = False
        if self._fired:
            self._fired = False
            self._task.uncancel()
            return True
        return False

    async def run(self, work: Awaitable[T]) -> T:
        """Await `work` in this task; ClientGone if the client hangs up first."""
        if self.gone:
            if asyncio.iscoroutine(work):
                work.close()
            raise ClientGone()
        self.armed = True
        try:
            return await work
        except asyncio.CancelledError:
            if self.caught():
                raise ClientGone() from None
            raise
        finally:
            self.armed = False

    def close(self) -> None:
        """Stop watching. A watcher task is cancelled from the loop's queue, behind a response
        written in this step: unwinding it is no part of the answer's latency."""
        self.armed = False
        if self._conn is not None:
            self._conn.unwatch_disconnect(self._on_gone)
        elif self._watcher is not None:
            self._loop.call_soon(self._watcher.cancel)


class GuardedStreamResponse:
    media_type = "text/event-stream"

    def __init__(self, guard: StreamGuard, headers: dict[str, str], watch: DisconnectWatch):
        self.guard = guard
        self.watch = watch
        self.raw_headers = _HEAD + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.guard.events()
        watch = self.watch
        try:
            if not watch.gone:
                watch.armed = True
                await self._pump(events, send)
        except asyncio.CancelledError:
            if not watch.caught():
                raise
        except OSError:
            pass  # the client's socket is gone; nothing to tell anyone
        except Exception as exc:
            log.error("sending a stream failed", exc_info=exc)
        finally:
            watch.close()
            await events.aclose()  # type: ignore[attr-defined]
            await self.guard.aclose()

    async def _pump(self, events: AsyncIterator[bytes], send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except (asyncio.CancelledError, OSError):
            raise
        except Exception as exc:
            log.error("stream failed inside the gateway", exc_info=exc)
            error = GatewayError("internal error while streaming; the answer is incomplete")
            await send(
                {"type": "http.response.body", "body": stream_error_event(error), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
