"""The HTTP layer: `create_app(settings)` (app.py) and its routers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gateway.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, **kwargs: Any) -> FastAPI:
    from gateway.api.app import create_app as build

    return build(settings, **kwargs)
