"""`gateway serve --workers N`: N processes answer on one port; settings reach every worker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.api.serving import access_log_enabled, shared_state_warning
from gateway.settings import Settings
from tests.gateway.routing_fixtures import WIZARD
from tests.gateway.test_cli import _free_port, clean_env

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "gateway.cli", "serve"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def test_two_workers_answer_on_one_port_with_the_command_lines_config(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            # the module from this checkout (the console script may belong to another one)
            [*SERVE, "--port", str(port), "--workers", "2", "--config", str(ROOT / "pricing.yaml")],
            # a GATEWAY_CONFIG that does not exist: the workers must get --config instead
            env=clean_env(
                LEPTON_API_KEY="sk-test-0123456789",
                GATEWAY_CONFIG=str(tmp_path / "missing.yaml"),
                PYTHONPATH=str(ROOT),
            ),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "gateway serve --workers 2 did not start"
                time.sleep(0.2)
        assert response.status_code == 200
        assert WIZARD in {m["id"] for m in response.json()["data"]}
        workers = [
            pid
            for pid in _children(process.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]  # (the other child is multiprocessing's resource tracker)
        assert len(workers) == 2, _children(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = log.read_text()
    assert "without REDIS_URL" in text  # per-worker state is said out loud
    assert "Traceback" not in text


def test_shared_state_warning_only_for_several_workers_without_redis() -> None:
    assert shared_state_warning(Settings(workers=1, redis_url=None)) is None
    assert shared_state_warning(Settings(workers=2, redis_url="redis://127.0.0.1:6379/9")) is None
    warning = shared_state_warning(Settings(workers=3, redis_url=None))
    assert warning is not None and "3 workers" in warning


def test_default_log_level_leaves_the_access_log_off() -> None:
    settings = Settings()
    assert settings.log_level == "warning" and not access_log_enabled(settings.log_level)
    assert access_log_enabled("INFO") and access_log_enabled("debug")
