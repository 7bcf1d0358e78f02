"""ASGI plumbing that ties an upstream call's life to the client connection.

`until_disconnect(work, receive)` runs a non-stream dispatch and cancels it (closing the
upstream connection) when the client hangs up. `GuardedStreamResponse` sends a StreamGuard's
events while listening for the hang-up, and always closes the guard afterwards, so the upstream
call ends and usage is recorded exactly once however the response ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, stream_error_event
from gateway.stream_guard import StreamGuard

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await `work` in this task; a watcher cancels it if the client hangs up first."""
    task = asyncio.current_task()
    assert task is not None
    state = {"finished": False, "gone": False}

    async def watch() -> None:
        await _wait_for_disconnect(receive)
        if not state["finished"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
        state["finished"] = True
        return result
    except asyncio.CancelledError:
        if state["gone"]:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        state["finished"] = True
        watcher.cancel()


class GuardedStreamResponse:
    media_type = "text/event-stream"

    def __init__(self, guard: StreamGuard, headers: dict[str, str]):
        self.guard = guard
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies must not hold the events back
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.guard.events()

        async def pump() -> None:
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
                    {
                        "type": "http.response.body",
                        "body": stream_error_event(error),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sender = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            results = await asyncio.gather(sender, watcher, return_exceptions=True)
            await events.aclose()  # type: ignore[attr-defined]
            await self.guard.aclose()
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            log.error("sending a stream failed", exc_info=error)
