"""What one gateway process lets its clients hold, and the answers it gives when they overreach.

    limits = ServerLimits.from_settings(settings)     # gateway/api/http_server.py enforces them

    setting (gateway/settings.py)   default  over it
    server_header_timeout_s         10 s     request line + headers not in by then (counted from
                                             the connection's start, or a keep-alive request's
                                             first byte): 408 if a request had begun, else close
    server_body_timeout_s           30 s     body not in by then (from the end of the headers,
                                             while the server reads): 408, close
    server_keepalive_timeout_s      5 s      an idle keep-alive connection is closed
    server_max_header_bytes         32 KiB   request line + headers: 431, close (checked on every
                                             read, so an unfinished head never grows past it)
    server_max_header_count         100      header fields: 431, close
    server_max_connections          2048     open connections per process: a new one gets 503 +
                                             Retry-After and is closed
    server_max_inflight_requests    512      requests served at once per process: 503 +
                                             Retry-After (/livez, /readyz, /metrics never shed)

`gateway serve` raises the process's soft open-file limit to max_connections + 2048 (up to the
hard limit) and warns when it cannot: below it accept() fails before the 503 can be sent.

A dripping client (slowloris) cannot extend the header deadline: it is set once per request and
new bytes do not move it. Every answer here is OpenAI's error shape, so SDK clients see a
normal API error (and retry the 503s after Retry-After).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

# Probes and metrics must answer while the gateway sheds: a liveness probe that failed under load
# would restart a busy replica, which only moves its load to the others.
NEVER_SHED = frozenset({b"/livez", b"/readyz", b"/metrics"})


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    max_connections: int = 2048
    max_inflight_requests: int = 512
    retry_after_s: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> ServerLimits:
        return cls(
            header_timeout_s=settings.server_header_timeout_s,
            body_timeout_s=settings.server_body_timeout_s,
            keepalive_timeout_s=settings.server_keepalive_timeout_s,
            max_header_bytes=settings.server_max_header_bytes,
            max_header_count=settings.server_max_header_count,
            max_connections=settings.server_max_connections,
            max_inflight_requests=settings.server_max_inflight_requests,
            retry_after_s=settings.server_retry_after_s,
        )


_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def error_body(status: int, message: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = {408: "request_timeout", 431: "headers_too_large", 503: "overloaded"}[status]
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


def raw_response(status: int, message: str, *, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (written straight to the socket)."""
    body = error_body(status, message)
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@functools.lru_cache(maxsize=8)
def shed_app(retry_after: int) -> Any:
    """The ASGI app a request gets when the process is at its in-flight limit: 503 + Retry-After.
    The connection stays open, so a body the client is still sending is read and dropped rather
    than cut off mid-send."""
    body = error_body(503, f"the gateway is at capacity; retry after {retry_after} s")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]

    async def shed(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return shed
