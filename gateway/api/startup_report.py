"""The startup summary: which routes are live, and why the others are not (one log line).

    routes_ready live=lepton/wizardlm-2-8x22b,openrouter/... skipped="deepinfra: no API key
    configured (DEEPINFRA_API_KEY); local: local backend not configured"

The reasons are the router's own (`available_from`), so the log says what routing will do.
No route live is a WARNING: every request would get 503 until a key is set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gateway.catalog import Catalog
from gateway.logging_setup import log_event
from gateway.routing import available_from

log = logging.getLogger("gateway.startup")


def route_summary(catalog: Catalog, providers: Mapping[str, Any]) -> tuple[list[str], dict]:
    """(live route ids, provider -> why its routes are skipped)."""
    check = available_from(providers)
    live: list[str] = []
    skipped: dict[str, str] = {}
    for route in catalog.routes():
        reason = check(route.provider)
        if reason is None:
            live.append(route.id)
        else:
            skipped.setdefault(route.provider, str(reason))
    return live, skipped


def log_route_summary(catalog: Catalog, providers: Mapping[str, Any]) -> None:
    live, skipped = route_summary(catalog, providers)
    log_event(
        log,
        logging.INFO if live else logging.WARNING,
        "routes_ready",
        live=",".join(live) or "none",
        skipped="; ".join(f"{name}: {why}" for name, why in skipped.items()) or None,
    )
