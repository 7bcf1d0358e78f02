"""The local backend's own OpenAI-compatible HTTP server (FastAPI).

    app = create_app(service)                      # a ready OpenAIService
    app = create_app(loader=lambda: load_service(...), model_name="wizardlm-2-8x22b")
                                                   # loads in the background: /livez answers at
                                                   # once, /readyz and /v1/* answer 503 until
                                                   # the weights are in

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or SSE with `"stream": true`),
GET /v1/models, GET /livez, GET /readyz (with the engine's capacity, for the gateway).
Every error is OpenAI's `{"error": {"message", "type", "code"}}` with its status; unexpected
failures are logged here and answered with a generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from local_backend.generation import EngineError, InvalidRequest, NotReady
from local_backend.openai_api import OpenAIService

log = logging.getLogger(__name__)

ServiceLoader = Callable[[], OpenAIService]


class _Holder:
    """The service once loaded, or why it is not (yet) there."""

    def __init__(self, service: OpenAIService | None) -> None:
        self.service = service
        self.load_error: str | None = None

    def get(self) -> OpenAIService:
        if self.service is None:
            reason = self.load_error or "the model is still loading"
            raise NotReady(f"the local backend is not ready: {reason}")
        return self.service


def create_app(
    service: OpenAIService | None = None,
    *,
    loader: ServiceLoader | None = None,
    model_name: str | None = None,
    stop_engine_on_shutdown: bool = True,
) -> FastAPI:
    if service is None and loader is None:
        raise ValueError("create_app needs a service or a loader")
    holder = _Holder(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if holder.service is None and loader is not None:
            threading.Thread(target=_load, args=(holder, loader), daemon=True).start()
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

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        svc = holder.get()
        capacity = svc.engine.capacity()
        return {
            "status": "ready",
            "model": svc.model_name,
            "max_slots": capacity.max_slots,
            "free_slots": capacity.free_slots,
            "queue_depth": capacity.queue_depth,
            "queue_size": capacity.queue_size,
            "accepting": capacity.accepting,
            "max_seq_len": svc.engine.max_seq_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return holder.get().models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        svc = holder.get()
        return await _respond(await _json_body(request), svc.chat, svc.chat_stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        svc = holder.get()
        return await _respond(await _json_body(request), svc.completion, svc.completion_stream)

    return app


def _load(holder: _Holder, loader: ServiceLoader) -> None:
    try:
        holder.service = loader()
    except Exception as exc:  # shown on /readyz; the details go to the log
        log.exception("loading the local model failed")
        holder.load_error = f"loading failed ({type(exc).__name__}: {exc})"


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None


async def _respond(
    body: Any,
    complete: Callable[[Any], Awaitable[dict[str, Any]]],
    stream: Callable[[Any], Awaitable[AsyncIterator[dict[str, Any]]]],
) -> Response:
    if isinstance(body, dict) and body.get("stream") is True:
        chunks = await stream(body)  # validation and queue errors raise here, as JSON errors
        return StreamingResponse(
            _sse(chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(await complete(body))


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
