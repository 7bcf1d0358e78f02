"""`python -m local_backend serve --tensor-parallel 2 --device cpu`: two ranks (one spawned)
answer over HTTP what one process answers, and stop together."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_backend.__main__ import main
from local_backend.loader import load_service

from .parallel_helpers import random_model, save_checkpoint, small_config

ROOT = Path(__file__).resolve().parents[2]
SIZES = ["--max-slots", "2", "--max-seq-len", "128", "--chat-format", "vicuna"]
PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tp_serve")
    # the real v1 vocabulary, so the bundled WizardLM-2 tokenizer's ids are valid
    save_checkpoint(random_model(small_config(vocab_size=32000), seed=5), folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned_ranks(pid: int) -> list[int]:
    """Child processes of `pid` started by multiprocessing's spawn (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = []
    for child in map(int, children):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            ranks.append(child)
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def _body(prompt: str) -> dict[str, Any]:
    return {"model": "tiny-tp", "prompt": prompt, "max_tokens": 8, "temperature": 0}


async def _single_process_answers(folder: Path) -> list[dict[str, Any]]:
    service = load_service(folder, device="cpu", max_slots=2, max_seq_len=128,
                           chat_format="vicuna", model_name="tiny-tp")  # fmt: skip
    try:
        return [await service.completion(_body(p)) for p in PROMPTS]
    finally:
        service.engine.stop()


async def test_serve_tensor_parallel_2_answers_like_one_process(
    checkpoint: Path, tmp_path: Path
) -> None:
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "local_backend", "serve", "--model-dir", str(checkpoint),
         "--device", "cpu", "--tensor-parallel", "2", "--port", str(port), "--cpu-threads", "1",
         "--model-name", "tiny-tp", "--log-level", "warning", *SIZES],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        expected = await _single_process_answers(checkpoint)  # while the ranks start
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                await asyncio.sleep(0.2)
            followers = _spawned_ranks(server.pid)
            assert len(followers) == 1  # rank 1
            # both at once: one batched prefill and decode across the two ranks
            replies = await asyncio.gather(
                *(client.post("/v1/completions", json=_body(p)) for p in PROMPTS)
            )
        for reply, want in zip(replies, expected, strict=True):
            assert reply.status_code == 200, reply.text
            got = reply.json()
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
            assert got["usage"] == want["usage"]
            assert got["usage"]["completion_tokens"] == 8
        assert expected[0]["choices"][0]["text"] != expected[1]["choices"][0]["text"]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        log.close()
    # uvicorn shuts down, then re-raises the SIGTERM it caught: the server ends by it
    assert code in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in followers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in followers)


def test_plan_prints_one_ranks_share(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    main(["plan", "--model-dir", str(checkpoint), "--device", "cpu", "--tensor-parallel", "2"])
    assert "per rank of 2: fits" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must split evenly over 3 ranks"):
        main(["plan", "--model-dir", str(checkpoint), "--device", "cpu",
              "--tensor-parallel", "3"])  # fmt: skip
