"""The gateway and the local backend's state: a failed load is a clear skip reason and a
/readyz entry, not "at capacity"; the in-process route clamps LOCAL_MAX_SEQ_LEN to the
model's context and answers to the catalog's names; over HTTP the gateway polls the backend's
/readyz and sends requests under the name it serves."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from gateway.local_price import MIN_DECODE_STEPS, LocalPriceFeed
from gateway.settings import HOSTED_PROVIDERS
from local_backend.loader import load_service
from local_backend.server import create_app
from tests.fakes.server import ServerThread
from tests.fakes.upstream import FakeUpstreams
from tests.gateway.conftest import Gateway, gateway_settings
from tests.local_server.tiny_checkpoint import write_tiny_checkpoint

MESSAGES = [{"role": "user", "content": "Name three colours."}]
NO_HOSTED_KEYS = {f"{name}_api_key": None for name in HOSTED_PROVIDERS}
LOCAL = {"local_device": "cpu", "local_dtype": "float32", "local_max_slots": 2}
ROUTE = "local/wizardlm-2-8x22b"


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeUpstreams]:
    upstreams = FakeUpstreams(list(HOSTED_PROVIDERS)).start()
    yield upstreams
    upstreams.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # context 512: shorter than the default LOCAL_MAX_SEQ_LEN (4096)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


@pytest.fixture(scope="module")
def broken(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("broken") / "tiny-mixtral"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def start(fakes: FakeUpstreams) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start_gateway(**overrides: Any) -> Gateway:
        fakes.reset()
        gateway = Gateway(gateway_settings(fakes, **{**LOCAL, **NO_HOSTED_KEYS, **overrides}))
        gateway.server.start()
        started.append(gateway)
        return gateway

    yield start_gateway
    for gateway in started:
        gateway.server.stop()


def test_a_failed_load_is_the_skip_reason_and_on_readyz(
    start: Callable[..., Gateway], broken: Path
) -> None:
    gateway = start(local_model_dir=broken)
    local = gateway.state.providers["local"]
    assert local.loaded.wait(60)  # type: ignore[attr-defined]
    with gateway.http() as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": "wizardlm-2", "messages": MESSAGES}
        )
        ready = http.get("/readyz")
    assert reply.status_code == 503
    skipped = reply.json()["error"]["skipped"][ROUTE]
    assert skipped.startswith("local backend failed to load: WeightsError")
    assert "model.norm.weight" in skipped
    assert ready.status_code == 503
    assert ready.json()["checks"]["local"]["status"] == "failed"
    assert "model.norm.weight" in ready.json()["checks"]["local"]["reason"]


def test_in_process_route_clamps_its_context_and_answers_catalog_names(
    start: Callable[..., Gateway], checkpoint: Path
) -> None:
    gateway = start(local_model_dir=checkpoint)  # LOCAL_MAX_SEQ_LEN left at its 4096 default
    local = gateway.state.providers["local"]
    assert local.loaded.wait(60)  # type: ignore[attr-defined]
    assert local.load_error is None, local.load_error  # type: ignore[attr-defined]
    service = local._service  # type: ignore[attr-defined]
    assert service.engine.max_seq_len == 512
    for name in ("wizardlm-2-8x22b", "microsoft/WizardLM-2-8x22B", "wizardlm-2"):
        assert name.lower() in service.served_names
    with gateway.http() as http:
        for model in ("wizardlm-2", "microsoft/WizardLM-2-8x22B"):
            body = {"model": model, "messages": MESSAGES, "max_tokens": 3}
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["provider"] == "local"
        ready = http.get("/readyz").json()
    assert ready["checks"]["local"]["status"] == "ready"
    assert ready["checks"]["local"]["max_seq_len"] == 512
    # the router uses the same clamped context: a longer prompt is the client's 400, not a
    # request the backend refuses
    route = next(r for r in gateway.state.catalog.routes() if r.kind == "local")
    assert route.context == 512
    long_chat = [{"role": "user", "content": "word " * 600}]  # > 512 tokens
    with gateway.http() as http:
        reply = http.post(
            "/v1/chat/completions", json={"model": "wizardlm-2", "messages": long_chat}
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"


def test_http_backend_state_reason_and_served_name(
    start: Callable[..., Gateway], checkpoint: Path
) -> None:
    service = load_service(
        checkpoint,
        device="cpu",
        model_name="my-own-name",
        chat_format="vicuna",
        max_slots=2,
        progress=False,
    )
    loading_gate: list[Any] = []

    def loader() -> Any:
        while not loading_gate:
            time.sleep(0.01)
        return service

    backend = ServerThread(create_app(loader=loader, model_name="my-own-name")).start()
    try:
        gateway = start(local_base_url=backend.url + "/v1", local_api_key="local-key")
        local = gateway.state.providers["local"]
        with gateway.http() as http:
            ready = http.get("/readyz").json()
            assert ready["checks"]["local"]["status"] == "loading"
            reply = http.post(
                "/v1/chat/completions", json={"model": "wizardlm-2", "messages": MESSAGES}
            )
            assert reply.status_code == 503
            assert reply.json()["error"]["skipped"][ROUTE].startswith("local backend loading")
            loading_gate.append(True)
            deadline = time.monotonic() + 20
            while gateway.call(local.refresh())["status"] != "ready":  # type: ignore[attr-defined]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # the catalog's slug is wizardlm-2-8x22b; the backend serves "my-own-name"
            body = {"model": "wizardlm-2", "messages": MESSAGES, "max_tokens": 3}
            reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["provider"] == "local"
        # enough decode steps at batch 1 to price from: the gateway's feed reads the backend's
        # measured figure from its /readyz
        engine = service.engine
        asyncio.run(
            service.completion(
                {
                    "model": "my-own-name",
                    "prompt": [1, 415],
                    "max_tokens": MIN_DECODE_STEPS + 2,
                    "ignore_eos": True,
                }
            )
        )
        measured = engine.telemetry.throughput()["decode_by_batch"]["1"]["tokens_per_s"]
        gateway.call(local.refresh())  # type: ignore[attr-defined]
        route = next(r for r in gateway.state.catalog.routes() if r.kind == "local")
        basis = LocalPriceFeed(gateway.state.catalog, gateway.state.providers).basis(route)
        assert basis is not None and basis["source"] == "measured" and basis["batch"] == 1
        assert basis["tokens_per_s"] == pytest.approx(measured)
        assert gateway.state.prices.measured is not None  # the app prices through a feed
    finally:
        backend.stop()
        service.engine.stop()
