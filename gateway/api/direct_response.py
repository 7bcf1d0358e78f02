"""A whole 200 JSON answer written straight to the connection, past uvicorn's ASGI `send`.

    if not write_whole_response(send, scope, fields, body):   # fields: b"name: value\\r\\n"...
        ...send it the ASGI way (two messages)...

uvicorn's `RequestResponseCycle.send` runs twice per answer (start, then body) and checks every
header of every response against two regular expressions, lower-cases it and builds the head
from a list: with the date and server headers, 8 headers and 16 regex searches per completion.
The completion endpoints' answers are built here from values the gateway controls (provider
names and route ids from the catalog, which loads only printable ASCII ones; numbers), so the
head can be one bytes join. This writes the answer the way uvicorn's `send` would, side
effects included: the access-log line when the log is on, `connection: close` and the close
when the request does not keep the connection alive, the cycle marked complete (a pipelined
request behind it starts) and the keep-alive timer (`on_response`). It does so only in the
plain case: `send` is a uvicorn cycle's, nothing sent yet, the client still there, writes not
paused for flow control, not a HEAD request. Otherwise it returns False and the caller sends
through ASGI as before (any other server, tests driving the app directly).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

_OK = STATUS_LINE[200]
_CLOSE = b"connection: close\r\n"


def write_whole_response(send: Any, scope: Any, fields: bytes, body: bytes) -> bool:
    """Write status 200, uvicorn's default headers, `fields` (complete header lines, content
    length and type among them) and `body` in one transport write; False: not done (see above)."""
    cycle = getattr(send, "__self__", None)
    if (
        type(cycle) is not RequestResponseCycle
        or cycle.response_started
        or cycle.disconnected
        or cycle.flow.write_paused
        or scope["method"] == "HEAD"
    ):
        return False
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if cycle.access_log:
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            200,
        )
    head = [_OK]
    head += [b"%s: %s\r\n" % pair for pair in cycle.default_headers]  # date, server
    head.append(fields)
    if not cycle.keep_alive:
        head.append(_CLOSE)
    head += (b"\r\n", body)
    transport = cycle.transport
    transport.write(b"".join(head))
    flush = getattr(transport, "flush", None)  # http_server.CoalescingTransport: all is here,
    if flush is not None:  # so out now, not one loop step later
        flush()
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True
