"""`POST /v1/chat/completions` and `POST /v1/completions`: the OpenAI API, served by routes.

Per request: authenticate (client key id) -> read the body within `max_body_bytes` (the
Content-Length header and the bytes actually received) and `max_body_depth` levels of nesting
(json_depth.py, before parsing) -> parse + validate once (schemas.py)
-> Router.plan -> Dispatcher. The client's own dict is what goes upstream (minus gateway-only
fields), so every field, standard or not, passes through. The handler works on the ASGI scope
and messages directly (no Request / Response objects: they were ~30 µs of a request's CPU on our
2-core machines), and one DisconnectWatch (streaming.py) per request cancels the upstream work
when the client hangs up (a callback from the connection under `gateway serve`). The served
answer's stats writes (its attempt and usage) are queued behind the response's write and run
once it is out (`after_response`, dispatch.py).

Responses carry `provider` (body and every stream chunk) and `usage.cost`, plus headers:
    x-gateway-provider     the provider that served (for streams: the one that started)
    x-gateway-route        its route id ("provider/slug")
    x-gateway-attempts     upstream attempts made (for streams: up to the first token)
    x-gateway-overhead-ms  the gateway's own time: from reading the request's first bytes
                           (HTTP parsing included) to the response encoded and about to be
                           written, minus the time blocked on upstream sockets up to each
                           wait's data arrival, and minus backoff sleeps. The CPU spent inside
                           an upstream call and the event loop's queueing count as the
                           gateway's. Not in it (a header cannot time its own sending): the
                           write of the response itself and the stats writes queued behind
                           it. For streams: up to the first chunk about to be sent.
The attempts trail (route, ok, error kind, status, latency per attempt) is added when the
client asks with the header `x-gateway-debug: attempts` or the body field
`"debug": {"attempts": true}`: as `attempts` in the body, or in a last `choices: []` chunk
before `[DONE]` for streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway.api.connection_watch import RECEIVED_AT
from gateway.api.direct_response import write_whole_response
from gateway.api.json_depth import nesting_exceeds
from gateway.api.schemas import validate_request
from gateway.api.state import GatewayState
from gateway.api.streaming import ClientGone, DisconnectWatch, GuardedStreamResponse
from gateway.dispatch import RequestContext
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, render_error
from providers import json_codec, upstream_wait
from providers.base import Endpoint

log = logging.getLogger("gateway.api")
router = APIRouter()

_WANTED = (b"authorization", b"content-length", b"x-gateway-debug")


def request_headers(scope: Scope) -> dict[bytes, str]:
    """The headers the handler reads (first value of each), from the ASGI scope."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


async def read_json_body(
    receive: Receive, declared: str | None, limit: int, max_depth: int = 64
) -> dict[str, Any]:
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidRequest("the Content-Length header is not a number") from None
        if too_big:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            continue
        part = message.get("body", b"")
        if part:
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
            parts.append(part)
        if not message.get("more_body", False):
            break
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    if nesting_exceeds(raw, max_depth):
        raise InvalidRequest(f"the request body nests deeper than {max_depth} levels")
    try:
        body = json_codec.loads(raw)
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _wants_attempts(header: str | None, body: dict[str, Any]) -> bool:
    debug = body.pop("debug", None)
    if isinstance(debug, dict) and debug.get("attempts") is True:
        return True
    return header is not None and "attempts" in header.lower()


def _headers(route_provider: str, route_id: str, attempts: int, overhead_ms: float) -> dict:
    return {
        "x-gateway-provider": route_provider,
        "x-gateway-route": route_id,
        "x-gateway-attempts": str(attempts),
        "x-gateway-overhead-ms": f"{overhead_ms:.3f}",
    }


class JSONBodyResponse:
    """A 200 with a JSON body and our headers: in one write where the server is uvicorn
    (direct_response.py), else as two ASGI messages (no Response object either way)."""

    __slots__ = ("content", "headers")

    def __init__(self, content: bytes, headers: dict[str, str]):
        self.content = content
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content = self.content
        fields = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        fields += f"content-length: {len(content)}\r\ncontent-type: application/json\r\n"
        if write_whole_response(send, scope, fields.encode("latin-1"), content):
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        headers += [
            (b"content-length", b"%d" % len(content)),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def serve(
    app: Any,
    scope: Scope,
    receive: Receive,
    endpoint: Endpoint,
    after_response: list[Callable[[], None]] | None = None,
) -> Any:
    # From the moment `gateway serve` read the request's bytes (its HTTP parsing included).
    started = scope.get(RECEIVED_AT) or time.perf_counter()
    state: GatewayState = app.gateway_state  # app.state.gw, without State's __getattr__
    headers = request_headers(scope)
    client_key = app.client_keys.authenticate(headers.get(b"authorization"))
    settings = state.settings
    quotas = app.state.quotas
    if quotas is not None:  # per-client limits (quotas.py): 429 before any work
        await quotas.check(client_key)
    body = await read_json_body(
        receive, headers.get(b"content-length"), settings.max_body_bytes, settings.max_body_depth
    )
    validate_request(body, endpoint)
    debug = _wants_attempts(headers.get(b"x-gateway-debug"), body)
    plan = await state.router.aplan(body, endpoint)
    options = body.get("stream_options")
    ctx = RequestContext(
        endpoint=endpoint,
        client_key=client_key,
        started=started,
        want_usage=isinstance(options, dict) and options.get("include_usage") is True,
        debug=debug,
        after_response=after_response,
    )
    upstream_wait.CURRENT.set(ctx.wait)  # the transports add their waits to it
    watch = DisconnectWatch(receive, scope)
    handed_over = False
    try:
        if body.get("stream"):
            guard = await watch.run(state.dispatcher.open_stream(plan, body, ctx))
            route = guard.route
            extra = _headers(route.provider, route.id, guard.attempts, ctx.overhead_ms())
            handed_over = True  # the response closes the watch when the stream is over
            return GuardedStreamResponse(guard, extra, watch)
        served = await watch.run(state.dispatcher.complete(plan, body, ctx))
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    finally:
        if not handed_over:
            watch.close()
    content = json_codec.dumps(served.body)
    extra = _headers(served.route.provider, served.route.id, len(ctx.trail), ctx.overhead_ms())
    return JSONBodyResponse(content, extra)


async def handle(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    """The endpoints as plain ASGI: create_app serves them ahead of the middleware stack."""
    after_response: list[Callable[[], None]] = []  # stats writes of the answer (dispatch.py)
    try:
        try:
            response = await serve(scope["app"], scope, receive, endpoint, after_response)
        except GatewayError as exc:
            response = render_error(exc)
        except ClientDisconnect:
            return  # hung up while sending the body
        except Exception as exc:
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            response = render_error(GatewayError("internal error"))
        await response(scope, receive, send)
    finally:
        if after_response:
            # Queued behind the response's write (http_server.py hands it to the socket from
            # the loop's queue too), so the client has its answer while these run.
            asyncio.get_running_loop().call_soon(_write_all, after_response)


def _write_all(writes: list[Callable[[], None]]) -> None:
    for write in writes:
        try:
            write()
        except Exception as exc:  # stats writes never raise; a bug must not lose the others
            log.error("a stats write failed", exc_info=exc)


FAST_PATHS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


async def chat_completions(request: Request) -> Any:
    return await serve(request.app, request.scope, request.receive, "chat")


async def completions(request: Request) -> Any:
    return await serve(request.app, request.scope, request.receive, "completions")


# Plain Starlette routes: the handlers take the Request and validate themselves, so FastAPI's
# dependency injection and response models would only add per-request work.
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
