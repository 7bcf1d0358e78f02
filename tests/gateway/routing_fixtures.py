"""Helpers for the routing, catalog, CLI, admin and models-API tests.

    catalog = real_catalog()                       # pricing.yaml as shipped
    catalog = small_catalog()                      # tiny contexts + quirks, for boundary tests
    stats = FakeStats({"lepton/wizardlm-2-8x22b": health(consecutive_failures=2)})
    router = make_router(catalog, available={"lepton", "deepinfra"}, stats=stats, seed=1)
    body = chat("hello", max_tokens=100, provider={"sort": "price"})

Nothing here touches the network; the Redis helpers use DB `REDIS_TEST_DB` and a fresh key
prefix per test, and delete only the keys under that prefix.
"""

from __future__ import annotations

import copy
import functools
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from gateway.catalog import Catalog, build_catalog, load_catalog
from gateway.prices import PriceBook
from gateway.routing import Availability, Router
from gateway.routing.prompt import PromptText
from gateway.settings import DEFAULT_CONFIG, HOSTED_PROVIDERS, Settings
from gateway.stats.base import (
    Attempt,
    RecordObserver,
    RouteHealth,
    SeriesPoint,
    Usage,
    UsageTotals,
    WindowStats,
)

REDIS_TEST_DB = 11
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"

HOSTED = ("lepton", "novita", "openrouter", "deepinfra")
WIZARD = "wizardlm-2-8x22b"
MIXTRAL = "mixtral-8x22b-instruct"
LEPTON = "lepton/wizardlm-2-8x22b"
NOVITA = "novita/microsoft/wizardlm-2-8x22b"
OPENROUTER = "openrouter/microsoft/wizardlm-2-8x22b"
DEEPINFRA = "deepinfra/microsoft/WizardLM-2-8x22B"
LOCAL = "local/wizardlm-2-8x22b"
OPENROUTER_MIXTRAL = "openrouter/mistralai/mixtral-8x22b-instruct"


@functools.cache
def real_catalog() -> Catalog:
    """pricing.yaml as shipped, parsed once (tests only read it)."""
    return load_catalog(DEFAULT_CONFIG)


# A small catalog: contexts of 1000 tokens so boundary prompts stay short, one route with an
# output limit and one with an unsupported parameter.
SMALL_CATALOG: dict[str, Any] = {
    "providers": {
        "lepton": {"base_url": "https://lepton.example/api/v1"},
        "novita": {"base_url": "https://novita.example/v3/openai", "unsupported_params": []},
        "deepinfra": {
            "base_url": "https://deepinfra.example/v1/openai",
            "limits": {"max_n": 2, "max_stop": 16, "default_max_tokens": 512},
        },
        "local": {
            "kind": "local",
            "gpu_cost_per_hour": 3.6,
            "tokens_per_s": 1000,  # = 1.00 USD / 1M
            "fallback_of_last_resort": True,
        },
    },
    "models": {
        "small": {
            "aliases": ["org/Small-Model"],
            "tokenizer": "v1",
            "chat_format": "vicuna",
            "weights": "org/Small-Model",
            "context": 1000,
            "routes": [
                {"provider": "lepton", "slug": "small", "input": 0.5, "output": 0.5},
                {
                    "provider": "novita",
                    "slug": "org/small",
                    "input": 0.6,
                    "output": 0.6,
                    "unsupported_params": ["logit_bias"],
                },
                {"provider": "deepinfra", "slug": "org/Small", "input": 0.7, "output": 0.7},
                {"provider": "local", "slug": "small"},
            ],
        },
        "small-long": {
            "tokenizer": "v3",
            "chat_format": "mistral_v3",
            "weights": "org/Small-Long",
            "context": 4000,
            "routes": [
                {
                    "provider": "lepton",
                    "slug": "small-long",
                    "input": 0.3,
                    "output": 0.9,
                    "max_output": 300,
                },
            ],
        },
    },
}


def small_catalog_data() -> dict[str, Any]:
    return copy.deepcopy(SMALL_CATALOG)


def small_catalog() -> Catalog:
    return build_catalog(small_catalog_data(), source="small.yaml")


def health(
    *,
    consecutive_failures: int = 0,
    circuit_open: bool = False,
    tokens_per_s: float | None = None,
    latency_p50_s: float | None = None,
    uptime: float | None = None,
) -> RouteHealth:
    window = WindowStats(
        requests=10 if uptime is not None else 0,
        uptime=uptime,
        tokens_per_s=tokens_per_s,
        latency_p50_s=latency_p50_s,
    )
    return RouteHealth(
        route_id="",
        windows={"5m": window, "30m": window, "1d": window},
        consecutive_failures=consecutive_failures,
        circuit_open=circuit_open,
        circuit="open" if circuit_open else "closed",
    )


class FakeStats:
    """A StatsStore whose health answers are set by the test."""

    observer: RecordObserver | None = None

    def __init__(self, healths: dict[str, RouteHealth] | None = None):
        self.healths = dict(healths or {})
        self.usage_totals: dict[str, dict[str, UsageTotals]] = {}

    def record_attempt(self, attempt: Attempt) -> None:
        pass

    def record_usage(self, usage: Usage) -> None:
        pass

    def route_health(self, route_id: str) -> RouteHealth:
        return self.healths.get(route_id) or RouteHealth(route_id=route_id)

    async def usage(self, *, by: str, day: str | None = None) -> dict[str, UsageTotals]:
        return self.usage_totals.get(by, {})

    async def history(self, route_ids: list[str], span: str) -> dict[str, list[SeriesPoint]]:
        return {route: [] for route in route_ids}

    async def start(self) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def refresh(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass

    @property
    def pending(self) -> int:
        return 0


class CountingCounter:
    """A counter whose exact count is fixed and remembered; its bound is bytes + 16."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.calls: list[str] = []

    def count(self, model: Any, body: dict[str, Any], endpoint: str) -> int:
        self.calls.append(model.id)
        return self.tokens

    def bound(self, model: Any, body: dict[str, Any], endpoint: str) -> int:
        return PromptText.of(body, endpoint).nbytes + 16


def make_router(
    catalog: Catalog | None = None,
    *,
    available: Availability | None = None,
    stats: Any = None,
    prices: PriceBook | None = None,
    counter: Any = None,
    seed: int = 0,
) -> Router:
    catalog = catalog or real_catalog()
    return Router(
        catalog,
        prices or PriceBook(catalog),
        stats or FakeStats(),
        set(HOSTED) if available is None else available,
        counter,
        random.Random(seed),
    )


def chat(text: str = "Hello!", *, model: str = WIZARD, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def redis_prefix() -> str:
    return f"moegw-test-{uuid.uuid4().hex[:12]}:"


async def delete_prefix(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def hermetic_settings(**overrides: Any) -> Settings:
    """Settings that ignore whatever the test runner's environment holds."""
    values: dict[str, Any] = {
        "gateway_config": DEFAULT_CONFIG,
        "redis_url": None,
        "gateway_api_keys": [],
        "gateway_admin_token": None,
        "local_model_dir": None,
        "local_base_url": None,
    }
    for name in HOSTED_PROVIDERS:
        values[f"{name}_api_key"] = None
        values[f"{name}_base_url"] = None
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """create_app(settings) with its lifespan running, and an in-process client for it."""
    from gateway.accounting import EstimateCounter
    from gateway.api.app import create_app

    app = create_app(settings, counter=EstimateCounter())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client
