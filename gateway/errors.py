"""Every error the gateway can raise, and the one place they become OpenAI-shaped responses.

    GatewayError                      base: status, type, code, message (safe to show a client)
    ├── InvalidRequest          400   bad JSON, schema, unsupported parameter values
    │   └── ContextLengthExceeded 400 prompt + max_tokens fits no route of the model
    ├── AuthenticationFailed    401   missing or unknown client key / admin token
    ├── ModelNotFound           404   no such model or alias in the catalog
    ├── PayloadTooLarge         413   request body over the configured limit
    ├── RateLimited             429   a client's own limit or budget (quotas.py), or
    │   └── UpstreamsRateLimited  429 every attempt on every route ended in an upstream 429
    ├── NoEligibleRoute         503   every route was filtered out; `skipped` says why, per route
    ├── AllRoutesFailed         502   every attempt on every candidate failed; `attempts` trail
    └── StreamInterrupted       502   the upstream failed after the answer started streaming:
                                      sent as the stream's last event (no [DONE] follows)

One failed attempt is a provider's `UpstreamError` (providers/errors.py, re-exported here): it
never reaches a client as is. The dispatcher retries it, fails over, and finally turns the
attempts into AllRoutesFailed, or into InvalidRequest / PayloadTooLarge when the upstream said
the request itself is bad (`fatal_for_request`). Messages never contain keys or credential
URLs: `redact()` (also from providers/errors.py) scrubs anything that slips through.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse

from providers.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    redact,
)

__all__ = [
    "AllRoutesFailed",
    "AuthenticationFailed",
    "ContextLengthExceeded",
    "GatewayError",
    "InvalidRequest",
    "ModelNotFound",
    "NoEligibleRoute",
    "PayloadTooLarge",
    "RateLimited",
    "StreamInterrupted",
    "UpstreamAuthError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHTTPError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamsRateLimited",
    "redact",
    "render_error",
    "stream_error_event",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = redact(message)
        if code is not None:
            self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        # whole seconds, rounded up: a client that waits what we say is never early
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))}


class UpstreamsRateLimited(RateLimited):
    """Every route said 429: the client should wait the smallest Retry-After, not see a 502."""

    code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None, attempts: list[dict]):
        super().__init__(message, retry_after=retry_after)
        self.attempts = attempts

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["attempts"] = self.attempts
        return body


class NoEligibleRoute(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_eligible_route"

    def __init__(self, message: str, *, skipped: dict[str, str]):
        reasons = "; ".join(f"{route}: {why}" for route, why in skipped.items())
        super().__init__(f"{message} ({reasons})" if reasons else message)
        self.skipped = dict(skipped)

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["skipped"] = self.skipped
        return body


class AllRoutesFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "all_routes_failed"

    def __init__(self, message: str, *, attempts: list[dict[str, Any]]):
        super().__init__(message)
        self.attempts = attempts

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["attempts"] = self.attempts
        return body


class StreamInterrupted(GatewayError):
    status = 502
    type = "upstream_error"
    code = "stream_interrupted"

    def __init__(self, message: str, *, attempts: list[dict[str, Any]]):
        super().__init__(message)
        self.attempts = attempts

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["attempts"] = self.attempts
        return body


def render_error(error: GatewayError) -> JSONResponse:
    """The one place an error becomes an HTTP response."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def stream_error_event(error: GatewayError) -> bytes:
    """The SSE event that ends a stream which already sent content (no [DONE] follows)."""
    import json

    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"
