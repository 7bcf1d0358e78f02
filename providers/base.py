"""The one narrow interface between the gateway and whatever serves the model.

    result = await provider.chat(ProviderRequest(...))
    # ProviderResponse  when request.stream is False: the upstream's OpenAI-shaped body
    # ProviderStream    when request.stream is True: async-iterate OpenAI chunk dicts

A provider raises only `providers.errors.UpstreamError` subclasses. It enforces the phase
timeouts it is given (connect, headers, first token, gap between chunks, total), normalises the
upstream's quirks (slug, headers, leaked end-of-sequence text) and never logs or returns a key.
Usage accounting, retries and fallback are the dispatcher's business, not the provider's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True, slots=True)
class PhaseTimeouts:
    connect: float = 5.0
    headers: float = 30.0  # request sent -> response status + headers
    first_token: float = 60.0  # headers -> first content token (streams) / body (non-streams)
    gap: float = 30.0  # between two stream chunks
    total: float = 600.0  # the whole attempt


@dataclass(slots=True)
class ProviderRequest:
    route_id: str  # "provider/slug", the key for stats and errors
    slug: str  # the upstream's model name; replaces body["model"]
    body: dict[str, Any]  # the client's OpenAI body, gateway-only fields removed
    endpoint: Endpoint = "chat"
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. OpenRouter's X-Title

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass(slots=True)
class ProviderResponse:
    body: dict[str, Any]  # OpenAI-shaped; "usage" as the upstream reported it
    upstream_id: str | None = None
    ttft_s: float | None = None  # request sent -> body received


class ProviderStream(Protocol):
    """Async iterator of OpenAI chunk dicts. `aclose()` cancels the upstream call."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    name: str

    async def chat(self, request: ProviderRequest) -> ProviderResponse | ProviderStream: ...

    async def ready(self) -> bool:
        """Cheap readiness for /readyz: configured, and (when local) loaded and not full."""
        ...

    def has_capacity(self) -> bool:
        """False when a capacity-limited provider (local) would queue or refuse right now."""
        ...

    async def aclose(self) -> None: ...
