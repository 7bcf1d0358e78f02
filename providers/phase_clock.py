"""One attempt's phase deadlines, in event-loop time.

    clock = PhaseClock(route_id, timeouts.total)
    response = await clock.wait(send(), "headers", timeouts.connect + timeouts.headers)

Each wait gets min(its phase's limit, the time left of the total); when the total is the
tighter one, the timeout is blamed on "total". Expiry raises `UpstreamTimeout(route, phase)`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.errors import UpstreamTimeout

# What a connection dropping mid-exchange looks like through httpx.
NETWORK_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)


class PhaseClock:
    """The attempt's deadlines (event-loop time): each wait gets min(phase limit, time left)."""

    __slots__ = ("deadline", "loop", "route_id", "start")

    def __init__(self, route_id: str, total: float):
        self.route_id = route_id
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.deadline = self.start + total

    def now(self) -> float:
        return self.loop.time()

    async def wait(
        self, awaitable: Any, phase: str, seconds: float, since: float | None = None
    ) -> Any:
        """Await with a limit of `seconds` (from `since`, default now); blame `phase`."""
        when = (self.loop.time() if since is None else since) + seconds
        blame = phase
        if when >= self.deadline:
            when, blame = self.deadline, "total"
        try:
            async with asyncio.timeout_at(when):
                return await awaitable
        except TimeoutError:
            raise UpstreamTimeout(self.route_id, blame) from None
