"""`gateway serve --workers N`: N processes answer on one port; settings reach every worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.api.serving import access_log_enabled, shared_state_warning, uvicorn_options
from gateway.settings import Settings
from gateway.stats import make_stats
from tests.fakes.upstream import FakeUpstreams
from tests.gateway.routing_fixtures import LEPTON, REDIS_URL, WIZARD, delete_prefix, redis_prefix
from tests.gateway.test_cli import _free_port, clean_env

ROOT = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "gateway.cli", "serve"]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


class Serve:
    """`gateway serve --workers N` from this checkout, as a subprocess; its output in a file."""

    def __init__(self, tmp_path: Path, *args: str, **env: str):
        self.port = _free_port()
        self.log = tmp_path / "serve.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                # the module from this checkout (the console script may belong to another one)
                [*SERVE, "--port", str(self.port), *args],
                env=clean_env(PYTHONPATH=str(ROOT), **env),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> httpx.Response:
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
            except httpx.TransportError:
                assert time.monotonic() < deadline, "gateway serve --workers did not start"
                time.sleep(0.2)

    def workers(self) -> list[int]:
        # (the other child is multiprocessing's resource tracker)
        return [
            pid
            for pid in _children(self.process.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=20)
        return self.log.read_text()


async def test_two_workers_on_one_port_share_usage_through_redis_exactly_once(
    tmp_path: Path,
) -> None:
    fakes = FakeUpstreams(["lepton"]).start()
    prefix = redis_prefix()
    serve = Serve(
        tmp_path,
        *("--workers", "2", "--config", str(ROOT / "pricing.yaml")),
        # a GATEWAY_CONFIG that does not exist: the workers must get --config instead
        GATEWAY_CONFIG=str(tmp_path / "missing.yaml"),
        LEPTON_API_KEY="sk-test-0123456789",
        LEPTON_BASE_URL=fakes.base_url("lepton"),
        REDIS_URL=REDIS_URL,
        STATS_PREFIX=prefix,
        STATS_FLUSH_INTERVAL_S="0.1",
    )
    try:
        models = serve.wait_ready()
        assert models.status_code == 200
        assert WIZARD in {m["id"] for m in models.json()["data"]}
        assert len(serve.workers()) == 2, _children(serve.process.pid)
        body = {"model": WIZARD, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(12):  # a new connection each: the kernel hands them to either worker
            with httpx.Client(timeout=10) as client:
                answer = client.post(
                    f"http://127.0.0.1:{serve.port}/v1/chat/completions", json=body
                )
                assert answer.status_code == 200, answer.text
        assert fakes["lepton"].served.requests == 12
        store = make_stats(REDIS_URL, prefix=prefix)
        try:
            deadline = time.monotonic() + 10
            while True:
                usage = await store.usage(by="route")
                served = usage.get(LEPTON)
                if served is not None and served.requests >= 12:
                    break
                assert time.monotonic() < deadline, usage
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # a flush after the last must not add anything
            assert (await store.usage(by="route"))[LEPTON].requests == 12
        finally:
            await store.aclose()
    finally:
        text = serve.stop()
        fakes.stop()
        await delete_prefix(prefix)
    assert "without REDIS_URL" not in text and "Traceback" not in text


def test_shared_state_warning_only_for_several_workers_without_redis() -> None:
    assert shared_state_warning(Settings(workers=1, redis_url=None)) is None
    assert shared_state_warning(Settings(workers=2, redis_url="redis://127.0.0.1:6379/9")) is None
    warning = shared_state_warning(Settings(workers=3, redis_url=None))
    assert warning is not None and "3 workers" in warning


def test_default_log_level_leaves_the_access_log_off() -> None:
    settings = Settings()
    assert settings.log_level == "warning" and not access_log_enabled(settings.log_level)
    assert access_log_enabled("INFO") and access_log_enabled("debug")
    assert uvicorn_options(settings)["access_log"] is False  # what `gateway serve` passes
