"""Fixtures of the local backend's server tests; they need `.[local]` and pytest only (no
transformers, triton or openai), so `make test-local-minimal` runs them in a bare venv too.

    tiny_checkpoint      a folder written by tiny_checkpoint.write_tiny_checkpoint (seed 0)
    run_server(app)      uvicorn on 127.0.0.1 in a thread (real sockets), stopped after the test
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from .tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf") / "wizardlm-2-8x22b")


class ServerThread:
    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def start(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def run_server() -> Iterator[Callable[[Any], ServerThread]]:
    started: list[ServerThread] = []

    def run(app: Any) -> ServerThread:
        server = ServerThread(app).start()
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()
