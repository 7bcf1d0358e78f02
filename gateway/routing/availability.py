"""Whether a route's provider can take a request now, and if not, why.

    check = available_from(providers)   # GatewayState.providers: the configured ones only
    check("deepinfra")                  # None (available), or the reason it is not

`NotConfigured` reasons mean the route is not part of this deployment at all (no key, no
backend); the router caches them and leaves such routes out of "too long for every route".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Availability = set[str] | frozenset[str] | Callable[[str], bool | str | None]


class NotConfigured(str):
    """An unavailability reason meaning the route is not part of this deployment at all (no key,
    no backend), as opposed to a passing one (at capacity). Such routes do not count when
    deciding whether a prompt is too long for every route."""


def available_from(providers: Mapping[str, Any]) -> Callable[[str], str | None]:
    """Availability from the configured providers (`GatewayState.providers`)."""

    def check(name: str) -> str | None:
        provider = providers.get(name)
        if provider is None:
            if name == "local":
                return NotConfigured("local backend not configured")
            return NotConfigured(f"no API key configured ({name.upper()}_API_KEY)")
        if provider.has_capacity():
            return None
        # a provider that knows why (the local backend: loading, failed, queue full) says so
        explain = getattr(provider, "unavailable_reason", None)
        return (explain() if explain is not None else None) or "at capacity"

    return check
