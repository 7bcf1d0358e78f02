"""How long one client request was blocked on its upstreams: the part of its wall time that is
not the gateway's (the `x-gateway-overhead-ms` header subtracts it).

    meter = WaitMeter()
    CURRENT.set(meter)        # in the request's task, before any provider call
    ...                       # the transports add each wait: meter.blocked_s

A wait counts from the moment the request's task starts waiting for upstream bytes (or a TCP
connection, or the in-process backend's answer) to the moment they *arrive*, stamped in the
socket's data callback — not to the moment the task runs again. The time between arrival and
resumption is the event loop busy with other work of this gateway, so it stays in the
gateway's share, as does the CPU spent building requests and parsing responses. The meter is a
context variable: provider code needs no extra argument, and tasks made for a request (timeouts)
copy the context and so update the same meter.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


class WaitMeter:
    """Seconds blocked on upstreams, summed over every wait of one client request."""

    __slots__ = ("blocked_s",)

    def __init__(self) -> None:
        self.blocked_s = 0.0


CURRENT: ContextVar[WaitMeter | None] = ContextVar("upstream_wait", default=None)


def add_blocked(seconds: float) -> None:
    """Count `seconds` of waiting against the current request (no-op outside one)."""
    meter = CURRENT.get()
    if meter is not None and seconds > 0.0:
        meter.blocked_s += seconds


async def blocked_on(work: Awaitable[T]) -> T:
    """Await `work`, counting all of its wall time as blocked (an in-process backend's answer,
    computed on its own thread: none of it is the gateway's event loop)."""
    started = time.perf_counter()
    try:
        return await work
    finally:
        add_blocked(time.perf_counter() - started)
