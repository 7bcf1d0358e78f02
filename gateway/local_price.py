"""The local route's price from the throughput the backend measures, not from a constant.

    feed = LocalPriceFeed(catalog, providers)
    prices.measured = feed.price          # PriceBook asks it for local routes (admin wins)
    feed.price(route) -> (input, output) | None      # USD per 1M tokens
    feed.basis(route) -> {"tokens_per_s", "source", "batch"}   # for the admin page and tests

price per 1M tokens = gpu_cost_per_hour / (tokens_per_s × 3600) × 1e6, with tokens_per_s:

1. measured: the backend's rolling decode throughput (`provider.decode_throughput()`, from
   its engine in-process or its /readyz over HTTP) at the largest batch size it has run for at
   least MIN_DECODE_STEPS steps: what a GPU-hour yields at the load the backend really sees;
2. before such traffic, pricing.yaml's `tokens_per_s` for the local provider: the bench figure
   of the device it runs on (docs/benchmarks.md; H200 int8: 377 tokens/s at batch 16).

Input and output tokens get the same price (a GPU-second is a GPU-second). A figure is
recomputed at most every `refresh_s` seconds, so the request path reads a cached tuple.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.catalog import Catalog, Route

MIN_DECODE_STEPS = 32  # fewer steps at a batch size are too few to price from


def local_price_per_m(gpu_cost_per_hour: float, tokens_per_s: float) -> float:
    return gpu_cost_per_hour / (tokens_per_s * 3600.0) * 1e6


def measured_tokens_per_s(throughput: Mapping[str, Any] | None) -> tuple[float, int] | None:
    """(tokens/s, batch) at the largest batch size with MIN_DECODE_STEPS steps, else None."""
    if not throughput:
        return None
    best: tuple[float, int] | None = None
    for batch, figure in (throughput.get("decode_by_batch") or {}).items():
        try:
            size, rate, steps = int(batch), figure.get("tokens_per_s"), figure.get("steps", 0)
        except (AttributeError, TypeError, ValueError):
            continue
        if not isinstance(rate, int | float) or rate <= 0 or steps < MIN_DECODE_STEPS:
            continue
        if best is None or size > best[1]:
            best = (float(rate), size)
    return best


class LocalPriceFeed:
    def __init__(
        self,
        catalog: Catalog,
        providers: Mapping[str, Any],
        *,
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._providers = providers
        self._refresh_s = refresh_s
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}  # route id -> (at, basis)
        self._local = [r for r in catalog.routes() if r.kind == "local"]
        self._version = 0  # bumped when a route's price changes

    def version(self) -> int:
        """How many times a local price changed (refreshing those due): PriceBook.generation
        adds it, so the router drops route facts that hold an old price."""
        for route in self._local:
            self.basis(route)
        return self._version

    def basis(self, route: Route) -> dict[str, Any] | None:
        """What the route's price rests on; None for a route that is not local."""
        if route.kind != "local":
            return None
        now = self._clock()
        cached = self._cache.get(route.id)
        if cached is not None and now - cached[0] < self._refresh_s:
            return cached[1]
        spec = self._catalog.providers[route.provider]
        assert spec.gpu_cost_per_hour is not None and spec.tokens_per_s is not None
        provider = self._providers.get(route.provider)
        report = getattr(provider, "decode_throughput", None)
        measured = measured_tokens_per_s(report() if report is not None else None)
        rate, batch, source = (
            (*measured, "measured") if measured else (spec.tokens_per_s, None, "bench")
        )
        basis = {"tokens_per_s": rate, "batch": batch, "source": source}
        basis["price"] = local_price_per_m(spec.gpu_cost_per_hour, rate)
        if cached is None or cached[1]["price"] != basis["price"]:
            self._version += 1
        self._cache[route.id] = (now, basis)
        return basis

    def price(self, route: Route) -> tuple[float, float] | None:
        basis = self.basis(route)
        if basis is None:
            return None
        return basis["price"], basis["price"]
