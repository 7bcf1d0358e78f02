"""The errors a provider raises: one failed attempt on one route, and `redact()`.

    UpstreamError                     one failed attempt (never shown to a client as is)
    ├── UpstreamConnectError          refused / reset / DNS: retryable
    ├── UpstreamTimeout               a phase timeout (`phase`): retryable
    ├── UpstreamHTTPError             non-2xx (`upstream_status`, `retry_after`): retryable for
    │   │                             408/409/425/429/5xx; 400/404/413/422 are the request's fault
    │   └── UpstreamAuthError         401/403 from upstream: our key is bad; fail over, don't retry
    └── UpstreamProtocolError         malformed JSON / SSE, missing fields, over a size limit

    RequestNotEncodable               not an UpstreamError: the provider could not encode the
                                      request (our side; no route is at fault, none is tried)

`retryable` decides a retry on the same route; any UpstreamError fails over to the next route
unless `fatal_for_request` (the upstream said the *request* is invalid, so every route would say
the same). `kind` is a short label for stats and logs ("http_500", "timeout_headers").

These live with the providers, not the gateway, so that `providers/` imports nothing of
`gateway/`: the gateway turns them into its client-facing errors (gateway/errors.py) in one
place, the dispatcher. Messages never contain keys or credential URLs: providers build them
from the route id and status only, and `redact()` scrubs anything that slips through.
"""

from __future__ import annotations

import re
from typing import Any

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


class UpstreamError(Exception):
    """One failed attempt on one route. `kind` is a short label for stats ("http_500")."""

    retryable = False
    fatal_for_request = False
    kind = "upstream"

    def __init__(self, route_id: str, message: str, **_: Any):
        super().__init__(f"{route_id}: {message}")
        self.message = redact(f"{route_id}: {message}")
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


class RequestNotEncodable(ValueError):
    """The request could not be encoded for the upstream (e.g. nested beyond the encoder's
    limit): the gateway's own failure, raised before any byte is sent, never a route's."""
