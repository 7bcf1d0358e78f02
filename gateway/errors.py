"""Every error the gateway can raise, and the one place they become OpenAI-shaped responses.

    GatewayError                      base: status, type, code, message (safe to show a client)
    ├── InvalidRequest          400   bad JSON, schema, unsupported parameter values
    │   └── ContextLengthExceeded 400 prompt + max_tokens fits no route of the model
    ├── AuthenticationFailed    401   missing or unknown client key / admin token
    ├── ModelNotFound           404   no such model or alias in the catalog
    ├── PayloadTooLarge         413   request body over the configured limit
    ├── RateLimited             429   a capacity-limited route or the gateway itself is full
    ├── NoEligibleRoute         503   every route was filtered out; `skipped` says why, per route
    ├── AllRoutesFailed         502   every attempt on every candidate failed; `attempts` trail
    ├── StreamInterrupted       502   the upstream failed after the answer started streaming:
    │                                 sent as the stream's last event (no [DONE] follows)
    └── UpstreamError                 one failed attempt (never shown to a client as is)
        ├── UpstreamConnectError      refused / reset / DNS: retryable
        ├── UpstreamTimeout           a phase timeout (`phase`): retryable
        ├── UpstreamHTTPError         non-2xx (`upstream_status`, `retry_after`): retryable for
        │                             408/409/425/429/5xx; 400/404/422 are the request's fault
        ├── UpstreamAuthError         401/403 from upstream: our key is bad; fail over, don't retry
        └── UpstreamProtocolError     malformed JSON / SSE, missing fields: fail over

`UpstreamError.retryable` decides a retry on the same route; any UpstreamError fails over to
the next route unless `fatal_for_request` (the upstream said the *request* is invalid, so every
route would say the same). Messages never contain keys or credential URLs: providers build them
from the route id and status only, and `redact()` scrubs anything that slips through.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse


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
        return {"retry-after": str(max(1, round(self.retry_after)))}


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


class UpstreamError(GatewayError):
    """One failed attempt on one route. `kind` is a short label for stats ("http_500")."""

    status = 502
    type = "upstream_error"
    retryable = False
    fatal_for_request = False
    kind = "upstream"

    def __init__(self, route_id: str, message: str, **kw: Any):
        super().__init__(f"{route_id}: {message}", **kw)
        self.route_id = route_id


class UpstreamConnectError(UpstreamError):
    retryable = True
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    retryable = True

    def __init__(self, route_id: str, phase: str):
        super().__init__(route_id, f"timed out waiting for {phase}")
        self.phase = phase
        self.kind = f"timeout_{phase}"


_RETRYABLE_STATUS = {408, 409, 425, 429}
_REQUEST_FAULT_STATUS = {400, 404, 413, 422}


class UpstreamHTTPError(UpstreamError):
    def __init__(
        self,
        route_id: str,
        upstream_status: int,
        detail: str = "",
        *,
        retry_after: float | None = None,
    ):
        msg = f"upstream answered HTTP {upstream_status}" + (f": {detail}" if detail else "")
        super().__init__(route_id, msg)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.kind = f"http_{upstream_status}"
        self.retryable = upstream_status in _RETRYABLE_STATUS or upstream_status >= 500
        self.fatal_for_request = upstream_status in _REQUEST_FAULT_STATUS


class UpstreamAuthError(UpstreamHTTPError):
    def __init__(self, route_id: str, upstream_status: int):
        super().__init__(route_id, upstream_status, "the gateway's key for this route was refused")
        self.retryable = False
        self.fatal_for_request = False
        self.kind = "auth"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


# Bearer tokens, "sk-..." style keys and credentials embedded in URLs (scheme://user:pass@host).
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\b(sk|pk|rk|key)-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"),
    re.compile(r"(?i)((?:api[_-]?key|token|secret|password)=)[^&\s\"']+"),
]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential, plus the given literal secrets."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _SECRET_PATTERNS[0].sub(r"\1[redacted]", text)
    text = _SECRET_PATTERNS[1].sub("[redacted]", text)
    text = _SECRET_PATTERNS[2].sub(r"\1[redacted]@", text)
    text = _SECRET_PATTERNS[3].sub(r"\1[redacted]", text)
    return text


def render_error(error: GatewayError) -> JSONResponse:
    """The one place an error becomes an HTTP response."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def stream_error_event(error: GatewayError) -> bytes:
    """The SSE event that ends a stream which already sent content (no [DONE] follows)."""
    import json

    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"
