"""The self-hosted route: our own backend, in-process or over HTTP.

    LOCAL_MODEL_DIR=/models/WizardLM-2-8x22B   in-process: the engine runs in this process
    LOCAL_BASE_URL=http://gpu-box:8001/v1       over HTTP: `python -m local_backend serve` there

In-process, the weights load on a background thread when the gateway starts. The backend's
load state is data (local_backend.load_progress.LoadState): while loading, or after a failed
load, the route has no capacity and `unavailable_reason()` says why ("loading (42% of 131 GB)",
"failed to load: WeightsError: ..."): the router's skip reason and the gateway's /readyz carry
it (`status()`). Once loaded the route has capacity while the engine's queue accepts work, so a
full backend is skipped rather than queued behind. The engine answers to the catalog's model
id and aliases, and its context is clamped to the model's. Over HTTP, local_http.py polls the
backend's /readyz for the same. Errors from the engine become UpstreamErrors: a full queue is
retryable (429), anything else the backend refuses fails over to the next route, because a limit
of ours (context, a parameter) says nothing about what a hosted route can do.

torch is imported only when the in-process backend is built: the gateway installs without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from providers.base import (
    PhaseTimeouts,
    ProviderRequest,
    ProviderResponse,
    ProviderStream,
)
from providers.errors import UpstreamError, UpstreamHTTPError, UpstreamTimeout
from providers.upstream_wait import blocked_on

log = logging.getLogger(__name__)


class LocalRejected(UpstreamError):
    """The backend refused the request (its context, a parameter): try the next route."""

    kind = "local_rejected"


class InProcessLocalProvider:
    """Our engine in this process, reached through its OpenAI service (no HTTP, no JSON)."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        model_name: str,
        chat_format: str,
        device: str,
        dtype: str,
        max_slots: int,
        max_seq_len: int,
        queue_size: int,
        aliases: tuple[str, ...] = (),
    ) -> None:
        from local_backend.load_progress import LoadState  # torch-free

        self.name = name
        self.model_name = model_name
        self.load_state = LoadState()
        self._load_args: dict[str, Any] = {
            "model_dir": model_dir,
            "model_name": model_name,
            "chat_format": chat_format,
            "device": None if device == "auto" else device,
            "dtype_name": None if dtype == "auto" else dtype,
            "max_slots": max_slots,
            "max_seq_len": max_seq_len,
            "queue_size": queue_size,
            "aliases": tuple(a for a in aliases if a != model_name),
            "progress": self.load_state.progress,
        }
        self._service: Any = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._thread = threading.Thread(target=self._load, name="local-backend-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            from local_backend.loader import DTYPES, load_service

            args = dict(self._load_args)
            dtype_name = args.pop("dtype_name")
            dtype = DTYPES.get(dtype_name) if dtype_name else None
            if dtype_name and dtype is None:
                raise ValueError(f"LOCAL_DTYPE {dtype_name!r} is not one of {sorted(DTYPES)}")
            self._service = load_service(dtype=dtype, **args)
            self.load_state.ready()
            log.info("local backend ready in %.1fs", time.perf_counter() - started)
        except Exception as exc:  # reported on /readyz and in the route's skip reason
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.load_state.fail(self.load_error)
            log.error("local backend failed to load: %s", self.load_error)
        finally:
            self.loaded.set()

    def status(self) -> dict[str, Any]:
        """The backend's state for the gateway's /readyz: loading (progress), ready, failed."""
        body = self.load_state.as_json()
        if self._service is not None:
            capacity = self._service.engine.capacity()
            body.update(accepting=capacity.accepting, queue_depth=capacity.queue_depth)
            body["max_seq_len"] = self._service.engine.max_seq_len
        return body

    def unavailable_reason(self) -> str | None:
        """Why the route is skipped now (None when it can take a request)."""
        state = self.load_state
        if state.phase == "failed":
            return f"local backend failed to load: {state.reason}"
        if self._service is None:
            progress = state.progress.snapshot()
            if progress["bytes_total"]:
                done = f"{progress['fraction']:.0%} of {progress['bytes_total'] / 1e9:.1f} GB"
                return f"local backend loading ({done})"
            return "local backend loading"
        if not self._service.engine.capacity().accepting:
            return "at capacity (local backend queue full)"
        return None

    def decode_throughput(self) -> dict[str, Any] | None:
        """The engine's rolling measured throughput (for the route's price); None unloaded."""
        service = self._service
        return service.engine.telemetry.throughput() if service is not None else None

    async def ready(self) -> bool:
        return self._service is not None and bool(self._service.engine.running)

    def has_capacity(self) -> bool:
        service = self._service
        return service is not None and bool(service.engine.capacity().accepting)

    async def aclose(self) -> None:
        if self._service is not None:
            await asyncio.to_thread(self._service.engine.stop)

    async def chat(self, request: ProviderRequest) -> ProviderResponse | ProviderStream:
        service = self._service
        if service is None:
            detail = self.load_error or "still loading"
            raise UpstreamHTTPError(request.route_id, 503, f"local backend: {detail}")
        body = dict(request.body, model=service.model_name)
        timeouts = request.timeouts
        started = time.perf_counter()
        phase = "total"
        try:
            if not request.stream:
                call = service.chat if request.endpoint == "chat" else service.completion
                async with asyncio.timeout(timeouts.total):
                    result = await blocked_on(call(body))
                return ProviderResponse(body=result, ttft_s=time.perf_counter() - started)
            open_stream = (
                service.chat_stream if request.endpoint == "chat" else service.completion_stream
            )
            # Opening the stream validates and enqueues; it must not outlive the first-token
            # or total budget either.
            if timeouts.first_token < timeouts.total:
                phase = "first_token"
            async with asyncio.timeout(min(timeouts.first_token, timeouts.total)):
                chunks = await blocked_on(open_stream(body))
        except TimeoutError:
            raise UpstreamTimeout(request.route_id, phase) from None
        except Exception as exc:
            raise _upstream_error(request.route_id, exc) from None
        return LocalStream(request.route_id, chunks, timeouts, started)


class LocalStream:
    """The engine's chunk iterator with the gateway's first-token, gap and total timeouts."""

    def __init__(
        self,
        route_id: str,
        chunks: AsyncIterator[dict[str, Any]],
        timeouts: PhaseTimeouts,
        started: float,
    ) -> None:
        self._route_id = route_id
        self._chunks = chunks
        self._timeouts = timeouts
        self._started = started

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        phase, limit = "first_token", self._timeouts.first_token
        deadline = self._started + self._timeouts.total
        iterator = aiter(self._chunks)
        while True:
            left = deadline - time.perf_counter()
            wait = min(limit, left)
            try:
                chunk = await blocked_on(asyncio.wait_for(anext(iterator), timeout=max(wait, 0.0)))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout(self._route_id, phase if wait < left else "total") from None
            except Exception as exc:
                raise _upstream_error(self._route_id, exc) from None
            yield chunk
            phase, limit = "gap", self._timeouts.gap

    async def aclose(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()  # the engine frees the sequence's slot at its next step


def _upstream_error(route_id: str, exc: Exception) -> UpstreamError:
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None) or type(exc).__name__
    if status in (429, 503):
        return UpstreamHTTPError(route_id, status, f"local backend: {message}", retry_after=0.5)
    if isinstance(status, int) and 400 <= status < 500:
        return LocalRejected(route_id, f"local backend refused the request: {message}")
    log.error("local backend failed a request: %s", message, exc_info=exc)
    return UpstreamHTTPError(route_id, 500, "local backend error")
