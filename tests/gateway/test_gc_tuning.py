"""The collector out of the request path (api/gc_tuning.py): only in a process `gateway serve`
runs, after its app has started; never in an app built elsewhere (tests build hundreds)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from gateway.api import serving
from gateway.api.app import create_app
from gateway.settings import Settings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_serve_tunes_the_collector_after_startup(restored_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    served: list[Any] = []

    def run(app: Any, **options: Any) -> None:  # uvicorn.run, as `serve` calls it
        assert not app.tune_gc or gc.get_threshold()[0] == 700  # nothing before startup
        served.append(app)
        with TestClient(app):  # the lifespan, as uvicorn runs it
            assert gc.get_threshold() == (12_345, 10, 10)
            assert gc.get_freeze_count() > 10_000  # the imports and the app, out of reach

    mp = pytest.MonkeyPatch()
    mp.setattr(uvicorn, "run", run)
    try:
        serving.serve(Settings(gc_gen0_threshold=12_345, workers=1))
    finally:
        mp.undo()
    assert served and served[0].tune_gc is True


def test_worker_processes_tune_it_too() -> None:
    assert serving.worker_app(Settings(workers=2)).tune_gc is True  # what each worker runs


def test_an_app_built_elsewhere_leaves_the_collector_alone(restored_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    with TestClient(create_app(Settings(gc_gen0_threshold=12_345))) as client:
        assert client.get("/livez").status_code == 200
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == frozen


def test_zero_keeps_pythons_threshold(restored_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    app = create_app(Settings(gc_gen0_threshold=0))
    app.tune_gc = True
    with TestClient(app):
        assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() > 0
