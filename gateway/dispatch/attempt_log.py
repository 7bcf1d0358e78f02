"""One structured log line per failed upstream attempt (`upstream_attempt_failed`).

Fields: route, provider, status (upstream HTTP status, when there was one), error (the
UpstreamError kind: auth, http_429, timeout_headers, connect, protocol...), phase (connect,
headers, first_token, gap, total, body, or stream: after the first token reached the client),
attempt (1-based, within the client's request), latency_ms, retry_after_s, endpoint, client
(the key's name or id) and message (already redacted by the provider, and again by the log
filter). An upstream 401/403 (our key refused: an operator must act) is an ERROR, the rest
WARNINGs (the dispatcher retries or fails over).
"""

from __future__ import annotations

import logging

from gateway.catalog import Route
from gateway.dispatch.context import RequestContext
from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamHTTPError, UpstreamTimeout
from gateway.logging_setup import log_event

log = logging.getLogger("gateway.dispatch")


def attempt_phase(error: UpstreamError, ttft_s: float | None) -> str:
    """Where in the attempt it failed."""
    if isinstance(error, UpstreamTimeout):
        return error.phase
    if ttft_s is not None:
        return "stream"  # the stream guard's segment: output had reached the client
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamHTTPError):
        return "headers"
    return "body"


def log_failed_attempt(
    route: Route, ctx: RequestContext, error: UpstreamError, latency_s: float, ttft_s: float | None
) -> None:
    level = logging.ERROR if error.kind == "auth" else logging.WARNING
    log_event(
        log,
        level,
        "upstream_attempt_failed",
        route=route.id,
        provider=route.provider,
        status=getattr(error, "upstream_status", None),
        error=error.kind,
        phase=attempt_phase(error, ttft_s),
        attempt=len(ctx.trail) + 1,
        latency_ms=round(latency_s * 1000.0, 1),
        retry_after_s=getattr(error, "retry_after", None),
        endpoint=ctx.endpoint,
        client=ctx.client_key,
        message=error.message,
    )
