"""The retry policy of one route: when to try the same route again, and how long to wait.

tenacity retries an attempt while the error is retryable (429, 5xx, connect errors, phase
timeouts) with jittered exponential backoff ("equal jitter"), or exactly the upstream's
Retry-After when it is within `retry_after_cap_s` (a longer one falls back at once).
`retry_attempts_per_route` attempts per route and `retry_budget_s` of backoff per request
bound it, and so does the request's deadline: a wait that would end past it is not taken (the
route fails over at once). The backoff counts as upstream time in the request's context.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from gateway.catalog import Route
from gateway.dispatch.context import RequestContext
from gateway.errors import UpstreamError
from gateway.settings import Settings
from providers.base import Provider, ProviderRequest

T = TypeVar("T")


class RetryPolicy:
    def __init__(self, settings: Settings, rng: random.Random):
        self.settings = settings
        self._rng = rng

    def should_retry(self, exc: BaseException) -> bool:
        """Retryable, and any Retry-After within the cap (a longer one: fall back at once)."""
        if not isinstance(exc, UpstreamError) or not exc.retryable:
            return False
        retry_after = getattr(exc, "retry_after", None)
        return retry_after is None or retry_after <= self.settings.retry_after_cap_s

    def delay(self, exc: BaseException | None, failures: int) -> float:
        """The wait after the `failures`-th failed attempt on a route."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        s = self.settings
        ceiling = min(s.retry_backoff_base_s * 2 ** (failures - 1), s.retry_after_cap_s)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)  # "equal jitter"

    async def run(
        self,
        ctx: RequestContext,
        attempt: Callable[[Route, Provider, ProviderRequest, RequestContext], Awaitable[T]],
        route: Route,
        provider: Provider,
        request: ProviderRequest,
    ) -> T:
        s = self.settings
        # The common case, a first attempt that succeeds, builds no retry controller: tenacity
        # takes over after the first retryable failure (its attempt numbers start after it).
        try:
            return await attempt(route, provider, request, ctx)
        except UpstreamError as exc:
            if not self.should_retry(exc):
                raise
            first = exc

        async def sleep(seconds: float) -> None:
            ctx.backoff_s += seconds
            await asyncio.sleep(seconds)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.delay(exc, 1 + state.attempt_number)

        def stop(state: RetryCallState) -> bool:
            if 1 + state.attempt_number >= s.retry_attempts_per_route:
                return True
            if state.upcoming_sleep >= ctx.remaining():
                return True
            return ctx.backoff_s + state.upcoming_sleep > s.retry_budget_s

        delay = self.delay(first, 1)
        if s.retry_attempts_per_route <= 1 or ctx.backoff_s + delay > s.retry_budget_s:
            raise first
        if delay >= ctx.remaining():
            raise first
        await sleep(delay)
        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(self.should_retry),
            sleep=sleep,
            reraise=True,
        )
        return await retrying(attempt, route, provider, request, ctx)
