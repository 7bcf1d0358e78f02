"""Dispatcher: try a plan's candidate routes in order until one serves the request.

    ctx = RequestContext(endpoint="chat", client_key=key_id, started=time.perf_counter())
    served = await dispatcher.complete(plan, body, ctx)        # non-stream: ServedResponse
    guard = await dispatcher.open_stream(plan, body, ctx)      # stream: StreamGuard (first
                                                               # output already in hand)
One attempt is one provider call. tenacity retries an attempt on the same route while the
error is retryable (429, 5xx, connect errors, phase timeouts) with jittered exponential backoff,
or exactly the upstream's Retry-After when it is within `retry_after_cap_s` (a longer one falls
back at once); `retry_attempts_per_route` attempts per route and `retry_budget_s` of backoff
per request bound it. Then the next candidate. An error that says the request itself is bad
(upstream 400/404/413/422) ends the request at once: every route would say the same.

Deadline: the request has one (`request_deadline_s`, in its RequestContext). Each attempt's
total is cut to what is left of it, so every read, a stream's included, stops in time; backoff
never sleeps past it; when it passes, no further attempt starts and the answer is
DeadlineExceeded (504). A route whose circuit is open is skipped unless it is the last
candidate (circuit_gate.py). A failure in the gateway's own code is never a route's: a request
the provider cannot encode is the client's 400, a provider bug fails over unrecorded.

For streams the attempt lasts until the first chunk with output arrives, so every failure
before the client sees a token (refused, 5xx, stall, cut, malformed chunk) fails over silently;
after it the StreamGuard (stream_guard.py) owns the stream.

Stats: exactly one `record_attempt` per attempt (a stream's is written when it ends, by the
guard), exactly one `record_usage` per served response (accounting.py). An attempt the client
cancelled by hanging up is recorded ok (the upstream did not fail) with error_kind "cancelled".
With `ctx.after_response` set (the API handler's list), the served answer's writes wait there
until its response is sent (they were ~20% of the gateway's time before it left, on 2 cores);
a failed attempt is always written at once, for the router to see.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from gateway.accounting import Accountant, body_output_text, client_usage
from gateway.catalog import Catalog, Route
from gateway.dispatch.attempt_log import log_failed_attempt
from gateway.dispatch.circuit_gate import Admission, CircuitGate
from gateway.dispatch.context import (
    DeadlinePassed,
    OpenedStream,
    RequestContext,
    ServedResponse,
    next_chunk,
    quietly_close,
    trail_entry,
)
from gateway.dispatch.retry import RetryPolicy
from gateway.dispatch.stream_guard import StreamGuard
from gateway.errors import (
    AllRoutesFailed,
    DeadlineExceeded,
    InvalidRequest,
    NoEligibleRoute,
    PayloadTooLarge,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamsRateLimited,
)
from gateway.routing import RoutePlan
from gateway.settings import Settings
from gateway.stats.base import Attempt, StatsStore
from providers.base import Provider, ProviderRequest, ProviderResponse, ProviderStream
from providers.errors import RequestNotEncodable
from providers.sse import chunk_carries_output

log = logging.getLogger(__name__)
T = TypeVar("T")

GATEWAY_ONLY_FIELDS = ("debug",)  # besides the router's GATEWAY_FIELDS (provider, models, ...)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        stats: StatsStore,
        accountant: Accountant,
        providers: dict[str, Provider],
        *,
        metrics: Any = None,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.catalog = catalog
        self.stats = stats
        self.accountant = accountant
        self.providers = providers
        self.metrics = metrics
        self.timeouts = settings.timeouts
        self.retry = RetryPolicy(settings, rng or random.Random())
        self.gate = CircuitGate(stats)

    # -- public -------------------------------------------------------------------------------

    async def complete(
        self, plan: RoutePlan, body: dict[str, Any], ctx: RequestContext
    ) -> ServedResponse:
        ctx.arm(self.settings.request_deadline_s)
        route, response = await self._first_success(plan, body, ctx, self._attempt_complete)
        model = self.catalog.models[route.model]
        data = response.body
        prompt, completion, counted = await self.accountant.acounts(
            route, model, data.get("usage"), body, ctx.endpoint, body_output_text(data)
        )
        settled = self.accountant.settle(
            route,
            model,
            ctx.client_key,
            prompt,
            completion,
            counted=counted,
            after=ctx.after_response,
        )
        data["model"] = model.id
        data["provider"] = route.provider
        data["usage"] = client_usage(data.get("usage"), settled)
        if ctx.debug:
            data["attempts"] = ctx.trail
        return ServedResponse(data, route)

    async def open_stream(
        self, plan: RoutePlan, body: dict[str, Any], ctx: RequestContext
    ) -> StreamGuard:
        ctx.arm(self.settings.request_deadline_s)
        _, opened = await self._first_success(plan, body, ctx, self.attempt_stream)
        return StreamGuard(self, plan, body, ctx, opened)

    async def reopen_stream(
        self, plan: RoutePlan, body: dict[str, Any], ctx: RequestContext, routes: list[Route]
    ) -> OpenedStream:
        """Continue a stream on the first of `routes` that opens (the stream guard's seam)."""
        _, opened = await self._first_success(plan, body, ctx, self.attempt_stream, routes=routes)
        return opened

    # -- the candidate loop and the retries ---------------------------------------------------

    def upstream_body(self, plan: RoutePlan, route: Route, body: dict[str, Any]) -> dict:
        out = plan.body_for(route, body)
        for name in GATEWAY_ONLY_FIELDS:
            out.pop(name, None)
        if out.get("stream"):
            options = out.get("stream_options")
            out["stream_options"] = {**(options if isinstance(options, dict) else {})}
            out["stream_options"]["include_usage"] = True  # usage is always known
        return out

    async def _first_success(
        self,
        plan: RoutePlan,
        body: dict[str, Any],
        ctx: RequestContext,
        attempt: Callable[[Route, Provider, ProviderRequest, RequestContext], Awaitable[T]],
        routes: list[Route] | None = None,
    ) -> tuple[Route, T]:
        routes = plan.candidates if routes is None else routes
        first_attempt = len(ctx.trail)  # a continued stream's trail already has its start
        # the router saw these configured; one that is gone now is a race with shutdown
        usable = [r for r in routes if r.provider in self.providers]
        tried = 0
        out_of_time = False
        for index, route in enumerate(usable):
            if tried == self.settings.max_fallback_routes:
                break
            if ctx.remaining() <= 0:
                out_of_time = True
                break
            admission = self.gate.admit(route.id, last=index == len(usable) - 1)
            if admission is Admission.SKIP:
                continue
            tried += 1
            request = ProviderRequest(
                route.id,
                route.slug,
                self.upstream_body(plan, route, body),
                ctx.endpoint,
                self.timeouts,
            )
            provider = self.providers[route.provider]
            try:
                return route, await self.retry.run(ctx, attempt, route, provider, request)
            except UpstreamError as exc:
                if exc.fatal_for_request:
                    self._observe_failure(route.model, exc.kind, route.id)
                    raise _rejected(exc) from None
            except DeadlinePassed:
                out_of_time = True
                break
            except RequestNotEncodable as exc:
                raise InvalidRequest(f"the request cannot be sent upstream: {exc}") from None
            finally:
                if admission is Admission.PROBE:
                    self.gate.release(route.id)
        model = plan.model.id
        if out_of_time or (ctx.trail and ctx.remaining() <= 0):
            self._observe_failure(model, "deadline_exceeded")
            raise DeadlineExceeded(
                f"the request's deadline of {self.settings.request_deadline_s:g} s passed "
                f"after {len(ctx.trail)} attempt(s)",
                attempts=ctx.trail,
            )
        if not ctx.trail:
            self._observe_failure(model, "no_eligible_route")
            unconfigured = {
                r.id: "provider not configured" for r in routes if r.provider not in self.providers
            }
            raise NoEligibleRoute(
                "no configured provider can serve this request",
                skipped={**plan.skipped, **unconfigured},
            )
        attempts = ctx.trail[first_attempt:]
        if attempts and all(a.get("status") == 429 for a in attempts):
            self._observe_failure(model, "all_routes_rate_limited")
            waits = [a["retry_after_s"] for a in attempts if a.get("retry_after_s") is not None]
            raise UpstreamsRateLimited(
                f"every route is rate limited for {model}; retry later",
                retry_after=min(waits) if waits else None,
                attempts=ctx.trail,
            )
        self._observe_failure(model, "all_routes_failed")
        summary = "; ".join(f"{a['route']}: {a.get('error', 'ok')}" for a in ctx.trail)
        raise AllRoutesFailed(f"every route failed for {model} ({summary})", attempts=ctx.trail)

    # -- attempts -----------------------------------------------------------------------------

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
    ) -> None:
        latency = time.perf_counter() - started
        attempt = Attempt(
            route_id=route.id,
            ok=error is None,
            latency_s=latency,
            ttft_s=ttft_s,
            completion_tokens=completion_tokens,
            error_kind=error.kind if error is not None else ("cancelled" if cancelled else None),
        )
        if error is None and ctx.after_response is not None:
            ctx.after_response.append(partial(self.stats.record_attempt, attempt))
        else:
            self.stats.record_attempt(attempt)
        if error is not None:
            log_failed_attempt(route, ctx, error, latency, ttft_s)
        ctx.trail.append(trail_entry(route, error is None, latency, error))

    async def _attempt_complete(
        self, route: Route, provider: Provider, request: ProviderRequest, ctx: RequestContext
    ) -> ProviderResponse:
        request.timeouts = ctx.attempt_timeouts(self.timeouts)  # DeadlinePassed: none left
        started = time.perf_counter()
        try:
            result = await provider.chat(request)
            if not isinstance(result, ProviderResponse):
                await result.aclose()
                raise UpstreamProtocolError(route.id, "answered a stream to a non-stream request")
        except UpstreamError as exc:
            self.record_attempt(route, ctx, started, error=exc)
            raise
        except asyncio.CancelledError:
            self.record_attempt(route, ctx, started, cancelled=True)
            raise
        except RequestNotEncodable:
            raise
        except Exception as exc:
            raise self._internal_failure(route, ctx, started, exc) from None
        usage = result.body.get("usage")
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        self.record_attempt(
            route,
            ctx,
            started,
            ttft_s=result.ttft_s,
            completion_tokens=completion if isinstance(completion, int) else 0,
        )
        return result

    async def attempt_stream(
        self, route: Route, provider: Provider, request: ProviderRequest, ctx: RequestContext
    ) -> OpenedStream:
        """Open the stream and read until its first output (an attempt fails over before it)."""
        request.timeouts = ctx.attempt_timeouts(self.timeouts)  # DeadlinePassed: none left
        started = time.perf_counter()
        stream: ProviderStream | None = None
        try:
            result = await provider.chat(request)
            if isinstance(result, ProviderResponse):
                raise UpstreamProtocolError(route.id, "answered JSON to a stream request")
            stream = result
            chunks = stream.__aiter__()
            head: list[dict[str, Any]] = []
            while True:
                chunk = await next_chunk(chunks)
                if chunk is None:
                    raise UpstreamProtocolError(route.id, "the stream ended without any output")
                head.append(chunk)
                if chunk_carries_output(chunk):
                    break
        except BaseException as exc:
            if stream is not None:
                await quietly_close(stream)
            if isinstance(exc, UpstreamError):
                self.record_attempt(route, ctx, started, error=exc)
                raise
            if isinstance(exc, asyncio.CancelledError):
                self.record_attempt(route, ctx, started, cancelled=True)
                raise
            if isinstance(exc, Exception) and not isinstance(exc, RequestNotEncodable):
                raise self._internal_failure(route, ctx, started, exc) from None
            raise
        model = self.catalog.models[route.model]
        ttft = time.perf_counter() - started
        return OpenedStream(route, model, stream, chunks, head, request.body, started, ttft)

    def _internal_failure(
        self, route: Route, ctx: RequestContext, started: float, exc: Exception
    ) -> UpstreamError:
        """A bug below us must not take the request down with it: log it, fail over. It is
        ours, not the route's: in the trail, never in the route's stats (no circuit opened)."""
        log.error("provider %s raised %s", route.provider, type(exc).__name__, exc_info=exc)
        error = UpstreamProtocolError(route.id, f"internal provider failure ({type(exc).__name__})")
        error.kind = "internal"
        ctx.trail.append(trail_entry(route, False, time.perf_counter() - started, error))
        return error

    def _observe_failure(self, model: str, outcome: str, route_id: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.observe_failed_request(model, outcome, route_id)


def _rejected(exc: UpstreamError) -> InvalidRequest | PayloadTooLarge:
    status = getattr(exc, "upstream_status", 400)
    message = f"the upstream rejected the request: {exc.message}"
    return PayloadTooLarge(message) if status == 413 else InvalidRequest(message)
