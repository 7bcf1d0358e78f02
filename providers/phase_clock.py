"""One attempt's phase deadlines, in event-loop time.

    clock = PhaseClock(route_id, timeouts.total)
    response = await clock.wait(send(), "headers", timeouts.connect + timeouts.headers)
    ...
    clock.stop()                        # the attempt is over: drop its timer

Each wait gets min(its phase's limit, the time left of the total); when the total is the
tighter one, the timeout is blamed on "total". Expiry raises `UpstreamTimeout(route, phase)`.

One timer serves every wait of the attempt (a stream waits once per network read): a new wait
whose deadline is later than the timer's only records it, and the timer, when it fires before
the current deadline, sets itself again for it. An `asyncio.timeout` per wait cost ~8 µs (a
timer made and cancelled each time); this way an attempt usually makes one. The expiry itself
works as asyncio.timeout's does: the waiting task is cancelled, and the cancellation is turned
into UpstreamTimeout where the wait catches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx

from providers.errors import UpstreamTimeout

# What a connection dropping mid-exchange looks like through httpx.
NETWORK_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)
T = TypeVar("T")


class PhaseClock:
    """The attempt's deadlines (event-loop time): each wait gets min(phase limit, time left)."""

    __slots__ = (
        "_expired",
        "_timer",
        "_timer_at",
        "_waiter",
        "_when",
        "deadline",
        "loop",
        "route_id",
        "start",
    )

    def __init__(self, route_id: str, total: float):
        self.route_id = route_id
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.deadline = self.start + total
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiter: asyncio.Task[Any] | None = None  # the task inside wait(), while one is
        self._when = 0.0  # that wait's deadline
        self._expired = False

    def now(self) -> float:
        return self.loop.time()

    async def wait(
        self, awaitable: Awaitable[T], phase: str, seconds: float, since: float | None = None
    ) -> T:
        """Await with a limit of `seconds` (from `since`, default now); blame `phase`."""
        when = (self.loop.time() if since is None else since) + seconds
        blame = phase
        if when >= self.deadline:
            when, blame = self.deadline, "total"
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._waiter, self._when, self._expired = task, when, False
        if self._timer is None or self._timer_at > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self.loop.call_at(when, self._on_timer), when
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise UpstreamTimeout(self.route_id, blame) from None
            raise
        finally:
            self._waiter = None
            self._expired = False

    def _on_timer(self) -> None:
        self._timer = None
        task = self._waiter
        if task is None:
            return  # between waits: the next wait sets the timer again
        if self.loop.time() < self._when:  # the deadline moved on since the timer was set
            self._timer, self._timer_at = self.loop.call_at(self._when, self._on_timer), self._when
            return
        self._expired = True
        self._waiter = None
        task.cancel()

    def stop(self) -> None:
        """The attempt is over: its timer will not be needed (safe to call more than once)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
