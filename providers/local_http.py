"""Our backend's own server over HTTP (`LOCAL_BASE_URL`): OpenAI-compatible, plus its /readyz.

    provider = HttpLocalProvider("local", "http://gpu-box:8001/v1", key)

It is an OpenAICompatProvider that also polls the backend's /readyz (every `poll_interval_s`
while the gateway routes) and so knows what an in-process backend knows:

- its load state and reason: loading (with progress), ready, failed, or unreachable; the
  router's skip reason (`unavailable_reason()`) and the gateway's /readyz (`status()`) carry it;
- whether its queue accepts work (a full backend is skipped, not queued behind);
- the model name it serves: requests go out under that name, whatever the catalog's slug, so a
  backend started with another --model-name never answers a client with "unknown model";
- its measured decode throughput (`decode_throughput()`, for the route's price).

Before the first answer, and for a server whose /readyz is not ours, the route is assumed
available (the request itself will tell); a backend that does not answer is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from providers.base import ProviderRequest, ProviderResponse
from providers.openai_compat import OpenAICompatProvider, OpenAIStream

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0


class HttpLocalProvider(OpenAICompatProvider):
    def __init__(
        self, name: str, base_url: str, api_key: str, *, poll_interval_s: float = 2.0
    ) -> None:
        super().__init__(name, base_url, api_key)
        root = base_url.rstrip("/").removesuffix("/v1")
        self._readyz_url = f"{root}/readyz"
        self._poll_interval_s = poll_interval_s
        self._poller: asyncio.Task[None] | None = None
        self.backend: dict[str, Any] | None = None  # the last /readyz body (None: not yet)

    async def refresh(self) -> dict[str, Any]:
        """Ask the backend's /readyz once; the answer (or why there is none) is kept."""
        body: Any
        try:
            response = await self._client.get(self._readyz_url, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:  # any failure is the backend's state, not ours
            body = {"status": "unreachable", "reason": f"{type(exc).__name__}: {exc}"}
        else:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("status"), str):
                # not our backend's /readyz (another OpenAI-compatible server): no state to
                # report, so the route is treated like a hosted one
                body = {"status": "unknown", "reason": f"/readyz answered {response.status_code}"}
        self.backend = body
        return body

    def _ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to poll from
                self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while not self._client.is_closed:
            await self.refresh()
            await asyncio.sleep(self._poll_interval_s)

    async def ready(self) -> bool:
        return (await self.refresh()).get("status") == "ready"

    def has_capacity(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        self._ensure_polling()
        body = self.backend
        if body is None:
            return None
        status = body.get("status")
        if status == "unknown":
            return None
        if status == "ready":
            return None if body.get("accepting", True) else "at capacity (local backend queue full)"
        if status == "loading":
            progress = body.get("progress") or {}
            fraction = progress.get("fraction")
            done = f" ({fraction:.0%})" if isinstance(fraction, int | float) else ""
            return f"local backend loading{done}"
        reason = body.get("reason") or (body.get("error") or {}).get("message") or "no reason"
        return f"local backend {status}: {reason}"

    def status(self) -> dict[str, Any]:
        body = self.backend or {"status": "unknown", "reason": "not probed yet"}
        keep = ("status", "reason", "progress", "model", "accepting", "queue_depth")
        return {key: body[key] for key in keep if key in body}

    def decode_throughput(self) -> dict[str, Any] | None:
        body = self.backend or {}
        throughput = body.get("throughput")
        return throughput if isinstance(throughput, dict) else None

    async def chat(self, request: ProviderRequest) -> ProviderResponse | OpenAIStream:
        served = (self.backend or {}).get("model")
        if isinstance(served, str) and served and served != request.slug:
            request = dataclasses.replace(request, slug=served)
        return await super().chat(request)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        await super().aclose()
