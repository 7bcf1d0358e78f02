"""`POST /v1/chat/completions` and `POST /v1/completions`: the OpenAI API, served by routes.

Per request: authenticate (client key id) -> read the body within `max_body_bytes` (the
Content-Length header and the bytes actually received) -> parse + validate once (schemas.py)
-> Router.plan -> Dispatcher. The client's own dict is what goes upstream (minus gateway-only
fields), so every field, standard or not, passes through.

Responses carry `provider` (body and every stream chunk) and `usage.cost`, plus headers:
    x-gateway-provider     the provider that served (for streams: the one that started)
    x-gateway-route        its route id ("provider/slug")
    x-gateway-attempts     upstream attempts made (for streams: up to the first token)
    x-gateway-overhead-ms  time spent in the gateway, excluding upstream waits and backoff
                           (for streams: up to the moment the first chunk is sent)
The attempts trail (route, ok, error kind, status, latency per attempt) is added when the
client asks with the header `x-gateway-debug: attempts` or the body field
`"debug": {"attempts": true}`: as `attempts` in the body, or in a last `choices: []` chunk
before `[DONE]` for streams.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gateway.api.schemas import validate_request
from gateway.api.state import GatewayState
from gateway.api.streaming import ClientGone, GuardedStreamResponse, until_disconnect
from gateway.dispatch import RequestContext
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, render_error
from providers.base import Endpoint

log = logging.getLogger("gateway.api")
router = APIRouter()


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise InvalidRequest("the Content-Length header is not a number") from None
        if too_big:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        parts.append(part)
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _wants_attempts(request: Request, body: dict[str, Any]) -> bool:
    debug = body.pop("debug", None)
    if isinstance(debug, dict) and debug.get("attempts") is True:
        return True
    header = request.headers.get("x-gateway-debug", "")
    return "attempts" in header.lower()


def _headers(route_provider: str, route_id: str, attempts: int, overhead_ms: float) -> dict:
    return {
        "x-gateway-provider": route_provider,
        "x-gateway-route": route_id,
        "x-gateway-attempts": str(attempts),
        "x-gateway-overhead-ms": f"{overhead_ms:.3f}",
    }


async def serve(request: Request, endpoint: Endpoint) -> Any:
    started = time.perf_counter()
    app_state = request.app.state
    state: GatewayState = app_state.gw
    client_key = app_state.client_keys.authenticate(request.headers.get("authorization"))
    body = await read_json_body(request, state.settings.max_body_bytes)
    validate_request(body, endpoint)
    debug = _wants_attempts(request, body)
    plan = await state.router.aplan(body, endpoint)
    options = body.get("stream_options")
    ctx = RequestContext(
        endpoint=endpoint,
        client_key=client_key,
        started=started,
        want_usage=isinstance(options, dict) and options.get("include_usage") is True,
        debug=debug,
    )
    try:
        if body.get("stream"):
            guard = await until_disconnect(
                state.dispatcher.open_stream(plan, body, ctx), request.receive
            )
            route = guard.route
            headers = _headers(route.provider, route.id, guard.attempts, ctx.overhead_ms())
            return GuardedStreamResponse(guard, headers)
        served = await until_disconnect(state.dispatcher.complete(plan, body, ctx), request.receive)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    content = json.dumps(served.body, separators=(",", ":")).encode()
    headers = _headers(served.route.provider, served.route.id, len(ctx.trail), ctx.overhead_ms())
    return Response(content, media_type="application/json", headers=headers)


async def handle(scope: Scope, receive: Receive, send: Send, endpoint: Endpoint) -> None:
    """The endpoints as plain ASGI: create_app serves them ahead of the middleware stack."""
    request = Request(scope, receive)
    try:
        response = await serve(request, endpoint)
    except GatewayError as exc:
        response = render_error(exc)
    except ClientDisconnect:
        return  # hung up while sending the body
    except Exception as exc:
        log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
        response = render_error(GatewayError("internal error"))
    await response(scope, receive, send)


FAST_PATHS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


async def chat_completions(request: Request) -> Any:
    return await serve(request, "chat")


async def completions(request: Request) -> Any:
    return await serve(request, "completions")


# Plain Starlette routes: the handlers take the Request and validate themselves, so FastAPI's
# dependency injection and response models would only add per-request work.
router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
