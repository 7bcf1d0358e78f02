"""Build the app's Provider instances from the catalog and the settings.

    providers = build_providers(catalog, settings)   # {"deepinfra": OpenAICompatProvider, ...}
    ...
    await close_providers(providers)

A hosted provider is built only when its `<PROVIDER>_API_KEY` is set; `<PROVIDER>_BASE_URL`
overrides the catalog's base URL. Optional headers the catalog lists (OpenRouter's HTTP-Referer
and X-Title) are filled from `<provider>_referer` / `<provider>_title` settings when set.
The local route exists only when the local backend is configured (LOCAL_MODEL_DIR in-process,
or LOCAL_BASE_URL over HTTP): `build_local_provider` builds it
(in-process: `providers.local.InProcessLocalProvider`; over HTTP: our server speaks OpenAI).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.catalog import Catalog, ProviderSpec
from providers.base import Provider
from providers.local import InProcessLocalProvider
from providers.local_http import HttpLocalProvider
from providers.openai_compat import OpenAICompatProvider

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger(__name__)

# optional header -> the settings field suffix that fills it
_OPTIONAL_HEADER_SETTINGS = {"HTTP-Referer": "referer", "X-Title": "title"}


def optional_headers(name: str, spec: ProviderSpec, settings: Settings) -> dict[str, str]:
    headers = {}
    for header in spec.optional_headers:
        suffix = _OPTIONAL_HEADER_SETTINGS.get(header)
        value = getattr(settings, f"{name}_{suffix}", None) if suffix else None
        if isinstance(value, str) and value:
            headers[header] = value
    return headers


def build_providers(catalog: Catalog, settings: Settings) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, spec in catalog.providers.items():
        if spec.kind == "local":
            if settings.local_base_url is not None or settings.local_model_dir is not None:
                providers[name] = build_local_provider(settings, catalog)
            continue
        key = settings.provider_key(name)
        if not key:
            continue
        base_url = settings.provider_base_url(name) or spec.base_url
        assert base_url is not None  # the catalog requires one for openai_compat
        providers[name] = OpenAICompatProvider(
            name,
            base_url,
            key,
            headers=optional_headers(name, spec, settings),
            strip_text=tuple(spec.strip_text),
        )
    return providers


async def close_providers(providers: dict[str, Provider]) -> None:
    results = await asyncio.gather(
        *(p.aclose() for p in providers.values()), return_exceptions=True
    )
    for name, result in zip(providers, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("closing provider %s failed: %s", name, type(result).__name__)


def local_route_model(catalog: Catalog) -> tuple[str, str]:
    """(slug, chat_format) of the catalog's local route; the backend serves that one model."""
    for model in catalog.models.values():
        for route in model.routes:
            if route.kind == "local":
                return route.slug, model.chat_format
    raise ValueError(f"{catalog.source}: no model has a route on a local provider")


def local_route_names(catalog: Catalog) -> tuple[str, ...]:
    """The catalog id and aliases of the model the local route serves (the backend answers to
    each, so no name a client may use reaches it as an unknown model)."""
    for model in catalog.models.values():
        if any(route.kind == "local" for route in model.routes):
            return (model.id, *model.aliases)
    return ()


def build_local_provider(settings: Settings, catalog: Catalog) -> Provider:
    """In-process when LOCAL_MODEL_DIR is set, else our backend's server at LOCAL_BASE_URL."""
    name = next(n for n, spec in catalog.providers.items() if spec.kind == "local")
    if settings.local_model_dir is not None:
        model_name, chat_format = local_route_model(catalog)
        return InProcessLocalProvider(
            name,
            settings.local_model_dir,
            model_name=model_name,
            chat_format=chat_format,
            device=settings.local_device,
            dtype=settings.local_dtype,
            max_slots=settings.local_max_slots,
            max_seq_len=settings.local_max_seq_len,
            queue_size=settings.local_queue_size,
            aliases=local_route_names(catalog),
        )
    assert settings.local_base_url is not None
    key = settings.provider_key("local") or "local"
    return HttpLocalProvider(name, settings.local_base_url, key)
