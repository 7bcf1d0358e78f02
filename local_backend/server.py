"""The local backend's own OpenAI-compatible HTTP server (FastAPI).

    app = create_app(service)                      # a ready OpenAIService
    app = create_app(loader=lambda: load_service(...), model_name="wizardlm-2-8x22b")
                                                   # loads in the background: /livez answers at
                                                   # once, /readyz and /v1/* answer 503 until
                                                   # the weights are in

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or SSE with `"stream": true`),
GET /v1/models, GET /livez, GET /readyz, GET /metrics (Prometheus, local_backend/metrics.py).
/readyz is the load state as data: 200 `{"status": "ready", capacity..., "throughput": {...}}`,
or 503 `{"status": "loading", "progress": {...}}` / `{"status": "failed", "reason": ...}`
(each with an OpenAI `error` too). `on_load_failed` lets the CLI exit non-zero.

A client that goes away is noticed while its request waits or runs, streamed or not: the
http.disconnect on the ASGI receive channel cancels the request (the engine drops it from the
queue at once, or frees its slots before its next step), and the engine counts and logs it.
Every error is OpenAI's `{"error": {"message", "type", "code"}}` with its status; unexpected
failures are logged here and answered with a generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from local_backend.generation import EngineError, InvalidRequest, NotReady
from local_backend.load_progress import LoadState
from local_backend.metrics import backend_registry
from local_backend.openai_api import OpenAIService

log = logging.getLogger(__name__)

ServiceLoader = Callable[[], OpenAIService]


class _Holder:
    """The service once loaded, or why it is not (yet) there."""

    def __init__(self, service: OpenAIService | None, state: LoadState) -> None:
        self.service = service
        self.state = state
        if service is not None:
            state.ready()

    def get(self) -> OpenAIService:
        if self.service is None:
            reason = self.state.reason or "the model is still loading"
            raise NotReady(f"the local backend is not ready: {reason}")
        return self.service

    def engine(self) -> Any:
        return self.service.engine if self.service is not None else None


def create_app(
    service: OpenAIService | None = None,
    *,
    loader: ServiceLoader | None = None,
    model_name: str | None = None,
    stop_engine_on_shutdown: bool = True,
    load_state: LoadState | None = None,
    on_load_failed: Callable[[str], None] | None = None,
) -> FastAPI:
    """`load_state`: the one the loader reports progress into (a fresh one if None);
    `on_load_failed(reason)` runs on the loading thread after a failed load."""
    if service is None and loader is None:
        raise ValueError("create_app needs a service or a loader")
    holder = _Holder(service, load_state or LoadState())
    registry = backend_registry(holder.engine, holder.state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if holder.service is None and loader is not None:
            args = (holder, loader, on_load_failed)
            threading.Thread(target=_load, args=args, daemon=True).start()
        yield
        if stop_engine_on_shutdown and holder.service is not None:
            await asyncio.to_thread(holder.service.engine.stop)

    app = FastAPI(title="moe-gateway local backend", lifespan=lifespan)
    app.state.holder = holder
    app.state.model_name = model_name or (service.model_name if service else None)
    _install_error_handlers(app)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        if holder.service is None:
            body = holder.state.as_json()
            try:
                holder.get()
            except NotReady as exc:
                body.update(exc.to_openai())
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        svc = holder.service
        capacity = svc.engine.capacity()
        return {
            "status": "ready",
            "model": svc.model_name,
            "aliases": list(svc.aliases),
            "max_slots": capacity.max_slots,
            "free_slots": capacity.free_slots,
            "queue_depth": capacity.queue_depth,
            "queue_size": capacity.queue_size,
            "accepting": capacity.accepting,
            "max_seq_len": svc.engine.max_seq_len,
            "throughput": svc.engine.telemetry.throughput(),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return holder.get().models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        svc = holder.get()
        return await _respond(request, await _json_body(request), svc.chat, svc.chat_stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        svc = holder.get()
        body = await _json_body(request)
        return await _respond(request, body, svc.completion, svc.completion_stream)

    return app


def _load(holder: _Holder, loader: ServiceLoader, on_failed: Callable[[str], None] | None) -> None:
    try:
        holder.service = loader()
        holder.state.ready()
    except Exception as exc:  # shown on /readyz; the traceback goes to the log
        log.exception("loading the local model failed")
        holder.state.fail(f"loading failed ({type(exc).__name__}: {exc})")
        if on_failed is not None:
            on_failed(holder.state.reason or "")


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None


async def _respond(
    request: Request,
    body: Any,
    complete: Callable[[Any], Awaitable[dict[str, Any]]],
    stream: Callable[[Any], Awaitable[AsyncIterator[dict[str, Any]]]],
) -> Response:
    if isinstance(body, dict) and body.get("stream") is True:
        chunks = await stream(body)  # validation and queue errors raise here, as JSON errors
        return _EventStream(
            _sse(chunks),
            on_close=chunks.aclose,  # type: ignore[attr-defined]
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    # The body is read: the next message on the receive channel is http.disconnect, when the
    # client gives up. Whichever comes first wins; a cancelled generation frees its slots.
    work = asyncio.ensure_future(complete(body))
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the engine stream's __aexit__ cancels the request
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return Response(status_code=499)  # nobody is listening: uvicorn drops it
    return JSONResponse(work.result())


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A StreamingResponse that always watches for http.disconnect, whatever ASGI spec version
    the server announces (Starlette stops watching from 2.4 on, and would only notice a gone
    client at its next write, which a queued request never makes)."""

    def __init__(self, *args: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream_until_disconnected(send, receive)
        finally:  # also when the client left before the first chunk was asked for
            with anyio.CancelScope(shield=True):
                await self._on_close()

    async def _stream_until_disconnected(self, send: Send, receive: Receive) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-write
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            async def watch() -> None:
                await _disconnected(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(watch)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events; a failure after the first chunk ends with an error event and no
    [DONE], so a client can never mistake a broken answer for a complete one."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    except Exception:
        log.exception("streaming a response failed")
        yield f"data: {json.dumps(_internal_error())}\n\n"
    finally:
        # The client may have gone away: closing the chunks cancels the generation. Starlette
        # cancels this task on disconnect, and a cancelled scope would cancel the close too.
        with anyio.CancelScope(shield=True):
            await chunks.aclose()  # type: ignore[attr-defined]


def _internal_error() -> dict[str, Any]:
    return {"error": {"message": "internal server error", "type": "server_error", "code": None}}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)
        return JSONResponse(_internal_error(), status_code=500)
