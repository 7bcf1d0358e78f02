"""The local route's price comes from the backend's measured decode throughput and the GPU's
$/hour (pricing.yaml), with the device's bench figure before any traffic (issue 11)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.catalog import Route, load_catalog
from gateway.local_price import MIN_DECODE_STEPS, LocalPriceFeed, local_price_per_m
from gateway.prices import PriceBook


class FakeLocal:
    def __init__(self, throughput: dict[str, Any] | None) -> None:
        self.throughput = throughput

    def decode_throughput(self) -> dict[str, Any] | None:
        return self.throughput


def by_batch(**figures: tuple[float, int]) -> dict[str, Any]:
    table = {b.removeprefix("b"): {"tokens_per_s": r, "steps": s} for b, (r, s) in figures.items()}
    return {"decode_tokens_per_s": 1.0, "decode_by_batch": table}


@pytest.fixture
def catalog() -> Any:
    return load_catalog("pricing.yaml")


def local_route(catalog: Any) -> Route:
    return next(r for r in catalog.routes() if r.kind == "local")


def test_bench_figure_before_traffic(catalog: Any) -> None:
    spec = catalog.providers["local"]
    assert spec.tokens_per_s == 377  # measured: H200, int8 weights, batch 16
    feed = LocalPriceFeed(catalog, {"local": FakeLocal(None)})
    basis = feed.basis(local_route(catalog))
    assert basis is not None and basis["source"] == "bench"
    want = spec.gpu_cost_per_hour / (377 * 3600) * 1e6
    assert feed.price(local_route(catalog)) == (pytest.approx(want), pytest.approx(want))
    # a backend that has run too few steps at every batch size is priced the same way
    few = FakeLocal(by_batch(b1=(40.0, MIN_DECODE_STEPS - 1)))
    assert LocalPriceFeed(catalog, {"local": few}).basis(local_route(catalog))["source"] == "bench"


def test_measured_throughput_at_the_largest_well_sampled_batch(catalog: Any) -> None:
    report = by_batch(b1=(38.9, 500), b8=(250.0, MIN_DECODE_STEPS), b16=(377.0, 3))
    feed = LocalPriceFeed(catalog, {"local": FakeLocal(report)})
    route = local_route(catalog)
    basis = feed.basis(route)
    assert basis is not None
    assert (basis["source"], basis["batch"], basis["tokens_per_s"]) == ("measured", 8, 250.0)
    price = local_price_per_m(catalog.providers["local"].gpu_cost_per_hour, 250.0)
    assert feed.price(route) == (price, price)
    hosted = next(r for r in catalog.routes() if r.kind != "local")
    assert feed.price(hosted) is None


def test_figures_are_cached_for_refresh_s(catalog: Any) -> None:
    now = [0.0]
    provider = FakeLocal(by_batch(b4=(100.0, 64)))
    feed = LocalPriceFeed(catalog, {"local": provider}, refresh_s=5.0, clock=lambda: now[0])
    route = local_route(catalog)
    first = feed.price(route)
    provider.throughput = by_batch(b4=(200.0, 64))
    now[0] = 4.9
    assert feed.price(route) == first
    now[0] = 5.0
    assert feed.price(route) is not None and feed.price(route)[0] == pytest.approx(first[0] / 2)


def test_price_book_uses_the_measured_price_below_an_admin_override(catalog: Any) -> None:
    book = PriceBook(catalog)
    route = local_route(catalog)
    assert book.effective(route) == (route.input_price, route.output_price)
    book.measured = LocalPriceFeed(catalog, {"local": FakeLocal(by_batch(b2=(80.0, 99)))}).price
    measured = local_price_per_m(catalog.providers["local"].gpu_cost_per_hour, 80.0)
    assert book.effective(route) == (measured, measured)
    asyncio.run(book.set(route.id, 0.5, 0.6))
    assert book.effective(route) == (0.5, 0.6)


def test_the_router_plans_with_the_new_measured_price_at_once(catalog: Any) -> None:
    """The router caches route facts (prices included) per request shape: a measured local
    price that moves must reach its ranking and max_price filter, not only the accountant."""
    from tests.gateway.routing_fixtures import make_router

    now = [0.0]
    provider = FakeLocal(by_batch(b4=(100.0, 64)))
    feed = LocalPriceFeed(catalog, {"local": provider}, refresh_s=5.0, clock=lambda: now[0])
    book = PriceBook(catalog)
    book.measured, book.measured_version = feed.price, feed.version
    router = make_router(catalog, available={"lepton", "local"}, prices=book)
    route = local_route(catalog)

    def ranked_price() -> float:
        ranked = router.rank("wizardlm-2-8x22b", prompt_tokens=100, max_tokens=10)
        return next(e.input_price for e in ranked if e.route.id == route.id)

    first = ranked_price()
    assert first == pytest.approx(feed.price(route)[0])  # type: ignore[index]
    provider.throughput = by_batch(b4=(400.0, 64))  # four times the throughput
    now[0] = 6.0
    assert ranked_price() == pytest.approx(first / 4)
    assert ranked_price() == pytest.approx(book.effective(route)[0])
