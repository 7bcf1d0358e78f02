"""What the dispatcher and the stream guard share: one request's context and an attempt's result.

The dispatcher (dispatcher.py) opens streams and hands them to the guard (stream_guard.py); the
guard needs a few of the dispatcher's services back (record an attempt, reopen the stream on
another route, the accountant). `AttemptRunner` names exactly those, so the guard depends on
this module and not on the dispatcher: the two files import in one direction only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.accounting import Accountant
from gateway.catalog import Model, Route
from gateway.errors import UpstreamError
from gateway.routing import RoutePlan
from providers.base import Endpoint, PhaseTimeouts, Provider, ProviderStream
from providers.upstream_wait import WaitMeter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestContext:
    """One client request's bookkeeping across its attempts."""

    endpoint: Endpoint
    client_key: str
    started: float  # time.perf_counter() when the request's first bytes were read
    want_usage: bool = False  # stream_options.include_usage from the client
    debug: bool = False  # put the attempts trail in the answer
    backoff_s: float = 0.0  # time in backoff sleeps (the retry budget)
    trail: list[dict[str, Any]] = field(default_factory=list)
    # time blocked on upstream sockets, up to each wait's data arrival (providers/upstream_wait)
    wait: WaitMeter = field(default_factory=WaitMeter)
    # Stats writes of the answer being served, for after the response is sent (None: at once).
    after_response: list[Callable[[], None]] | None = None
    # perf_counter() time by which the request must be over: attempts, backoff, stream reads
    deadline: float = math.inf

    def overhead_ms(self) -> float:
        """The gateway's own time so far: wall time since the request's bytes were read, minus
        the time blocked on upstream sockets (to the bytes' arrival) and backoff sleeps. CPU
        spent inside an upstream call (building the request, parsing the answer) and waits
        for this process's event loop are the gateway's, so they count."""
        waited = self.wait.blocked_s + self.backoff_s
        return max(0.0, (time.perf_counter() - self.started - waited) * 1000.0)

    def arm(self, seconds: float) -> None:
        """Set the deadline `seconds` after the request began, unless one is set already."""
        if self.deadline == math.inf:
            self.deadline = self.started + seconds

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def attempt_timeouts(self, base: PhaseTimeouts) -> PhaseTimeouts:
        """The phase timeouts of an attempt starting now: its total cut to what is left."""
        left = self.remaining()
        if left <= 0:
            raise DeadlinePassed()
        if left >= base.total:
            return base
        # (not dataclasses.replace: it reads the fields anew on every call, per request)
        return PhaseTimeouts(base.connect, base.headers, base.first_token, base.gap, left)


class DeadlinePassed(Exception):
    """The request's deadline passed before another attempt or backoff could start."""


@dataclass(slots=True)
class ServedResponse:
    body: dict[str, Any]
    route: Route


@dataclass(slots=True)
class OpenedStream:
    """A stream attempt that produced its first output: the guard takes it from here."""

    route: Route
    model: Model
    stream: ProviderStream
    chunks: AsyncIterator[dict[str, Any]]
    head: list[dict[str, Any]]  # chunks read so far (role chunks, then the first output)
    body: dict[str, Any]  # what was sent upstream
    started: float  # perf_counter at the attempt's start
    ttft_s: float


def trail_entry(route: Route, ok: bool, latency_s: float, exc: UpstreamError | None) -> dict:
    entry: dict[str, Any] = {
        "route": route.id,
        "provider": route.provider,
        "ok": ok,
        "latency_ms": round(latency_s * 1000.0, 2),
    }
    if exc is not None:
        entry["error"] = exc.kind
        entry["message"] = exc.message
        status = getattr(exc, "upstream_status", None)
        if status is not None:
            entry["status"] = status
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            entry["retry_after_s"] = retry_after
    return entry


class AttemptRunner(Protocol):
    """The dispatcher as the stream guard sees it."""

    accountant: Accountant
    providers: dict[str, Provider]
    metrics: Any

    def record_attempt(
        self,
        route: Route,
        ctx: RequestContext,
        started: float,
        *,
        error: UpstreamError | None = None,
        ttft_s: float | None = None,
        completion_tokens: int = 0,
        cancelled: bool = False,
    ) -> None: ...

    async def reopen_stream(
        self, plan: RoutePlan, body: dict[str, Any], ctx: RequestContext, routes: list[Route]
    ) -> OpenedStream:
        """The first route of `routes` that opens; GatewayError when none does."""
        ...


async def next_chunk(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    """The next chunk, or None at the end of the stream."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


async def quietly_close(stream: ProviderStream) -> None:
    try:
        await stream.aclose()
    except Exception as exc:  # closing a broken connection may fail again; nothing to do
        log.debug("closing an upstream stream failed: %s", type(exc).__name__)
