"""Load state as data: /readyz says loading (with progress), ready or failed (with the reason);
`serve` exits non-zero after a failed load unless --stay-up-on-load-failure; progress shows as
a tqdm bar on a terminal and as log lines (bytes, shards, GB/s) elsewhere."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from local_backend.load_progress import LoadProgress, LoadState
from local_backend.loader import load_service
from local_backend.model import load_model
from local_backend.server import create_app

from .cli import free_port, output, serve_cli
from .conftest import wait_for


@pytest.fixture(scope="module")
def broken_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint less one expert's w2: the config reads, the weights do not."""
    folder = tmp_path_factory.mktemp("broken") / "wizardlm-2-8x22b"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_a_failed_load_exits_non_zero_with_the_reason(broken_checkpoint: Path) -> None:
    process = serve_cli(broken_checkpoint, free_port())
    assert process.wait(90) == 1
    assert "experts.3.w2.weight" in output(process)


def test_stay_up_reports_the_failure_on_readyz_and_metrics(broken_checkpoint: Path) -> None:
    port = free_port()
    process = serve_cli(broken_checkpoint, port, "--stay-up-on-load-failure")
    url = f"http://127.0.0.1:{port}"
    try:

        def failed() -> bool:
            assert process.poll() is None, output(process)
            try:
                return httpx.get(url + "/readyz").json().get("status") == "failed"
            except httpx.TransportError:
                return False

        wait_for(failed, timeout=90)
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in ready.json()["reason"]
        assert ready.json()["error"]["code"] == "not_ready"
        assert httpx.get(url + "/livez").status_code == 200
        assert 'local_backend_load_state{state="failed"} 1.0' in httpx.get(url + "/metrics").text
    finally:
        process.terminate()
        process.wait(20)


def test_readyz_shows_progress_while_loading_then_ready(
    tiny_checkpoint: Path, run_server: Any
) -> None:
    state, release = LoadState(LoadProgress(enabled=False)), threading.Event()

    def loader() -> Any:
        state.progress.begin(bytes_total=1000, shards_total=4)
        state.progress.advance(300)
        state.progress.shard_done(400)
        release.wait(30)
        return load_service(tiny_checkpoint, device="cpu", max_slots=1, max_seq_len=64)

    app = create_app(loader=loader, model_name="tiny", load_state=state)
    server = run_server(app)
    wait_for(lambda: state.progress.shards_done == 1)
    loading = httpx.get(server.url + "/readyz")
    assert loading.status_code == 503
    body = loading.json()
    assert body["status"] == "loading"
    assert body["progress"]["bytes_done"] == 400 and body["progress"]["fraction"] == 0.4
    assert (body["progress"]["shards_done"], body["progress"]["shards_total"]) == (1, 4)
    release.set()
    wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 200, timeout=60)
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["max_seq_len"] == 64
    assert ready["throughput"]["decode_tokens_per_s"] is None  # no traffic yet
    app.state.holder.service.engine.stop()


def test_progress_logs_bytes_shards_and_speed_without_a_terminal(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    progress = LoadProgress(bar=False, log_every_s=0.0)
    with caplog.at_level(logging.INFO, logger="local_backend.load_progress"):
        load_model(tiny_checkpoint, dtype=torch.float32, progress=progress)
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    snap = progress.snapshot()
    assert snap["bytes_done"] == snap["bytes_total"] == size
    assert (snap["shards_done"], snap["shards_total"]) == (1, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) > 3  # a line per tensor at log_every_s=0, plus the first and last
    assert "GB/s" in lines[-1] and "shard 1/1" in lines[-1]


def test_progress_draws_a_bar_on_a_terminal(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_model(tiny_checkpoint, progress=LoadProgress(bar=True))
    err = capsys.readouterr().err
    assert "loading weights" in err and "100%" in err
