"""`gateway serve --workers N`: N processes, each accepting on its own socket of the same port
(SO_REUSEPORT), under a small supervisor.

    supervise(settings, log_config)        # serving.serve, when settings.workers > 1

Why not uvicorn's supervisor: it binds one socket that every worker accepts from, so which worker
takes a new connection is a race among the idle ones, and a keep-alive connection then stays
with the winner. Measured with wrk's 64 connections (bench/overhead.py, 6 runs): the busiest of
two workers did 53-62% of the work, and in one run all of it, which no number of free cores can
scale. With SO_REUSEPORT each worker has its own accept queue and the kernel spreads new
connections over them by a hash of their addresses: 64 connections split about evenly, and the
split no longer depends on which worker happened to be idle.

The supervisor binds the port first without listening: that reserves it (a worker's bind then
never races another program), resolves port 0, and fails at once with exit 3 when the port is
taken. It starts N spawned workers, each building its own app from the same `Settings` (so
command-line options reach every worker) with the collector tuned (gc_tuning.py); restarts a
worker that dies, unless workers keep dying right after starting (a bad setting: exit 3); and
on SIGINT or SIGTERM stops every worker gracefully (uvicorn's own shutdown: requests in flight
finish within `timeout_graceful_shutdown`), killing what is left after that. A worker whose
supervisor dies (even by SIGKILL) gets SIGTERM from the kernel and stops the same way.

Only processes of the same user can join a SO_REUSEPORT group, so no other account can take a
share of the connections. Linux: elsewhere SO_REUSEPORT does not balance (macOS) or does not
exist (Windows); run one worker per container or host there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

from gateway.api.http_server import uvicorn_options as server_options
from gateway.logging_setup import configure_logging
from gateway.settings import Settings

log = logging.getLogger("gateway.serve")

GRACE_S = 10  # uvicorn's timeout_graceful_shutdown, per worker
STARTUP_S = 10.0  # a worker that exits sooner than this after starting "died at startup"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options of one process (host, port, the hardened protocol and limits)."""
    options = {"host": settings.host, "port": settings.port, "timeout_graceful_shutdown": GRACE_S}
    options.update(server_options(settings))
    return options


def shared_state_warning(settings: Settings) -> str | None:
    """What an operator must know about N workers without Redis (None when all is shared)."""
    if settings.workers > 1 and not settings.redis_url:
        return (
            f"{settings.workers} workers without REDIS_URL: each worker keeps its own route "
            "health, circuit state, usage and price overrides (set REDIS_URL to share them)"
        )
    return None


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def worker_app(settings: Settings) -> Any:
    """One worker's app: built in the worker process, the collector tuned once it has started."""
    from gateway.api.app import create_app

    app = create_app(settings)
    app.tune_gc = True
    return app


def exit_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent dies (Linux prctl PR_SET_PDEATHSIG), so a
    supervisor killed with SIGKILL leaves no worker holding the port; exits now when the
    parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(0)


def run_worker(
    settings: Settings, port: int, log_config: dict[str, Any] | None, parent: int
) -> None:
    """A worker process: its own socket on the shared port, one uvicorn server on it."""
    exit_with_parent(parent)
    import uvicorn

    options = uvicorn_options(settings)
    options["port"] = port
    if log_config is not None:
        options["log_config"] = log_config
    sock = shared_port_socket(settings.host, port)
    sock.listen(options["backlog"])
    server = uvicorn.Server(uvicorn.Config(worker_app(settings), **options))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)


class Supervisor:
    def __init__(self, settings: Settings, port: int, log_config: dict[str, Any] | None):
        self.settings, self.port, self.log_config = settings, port, log_config
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[tuple[BaseProcess, float]] = []  # (process, monotonic start time)
        self.stopping = threading.Event()

    def start(self, index: int) -> tuple[BaseProcess, float]:
        process = self.context.Process(
            target=run_worker,
            args=(self.settings, self.port, self.log_config, os.getpid()),
            name=f"gateway-worker-{index}",
        )
        process.start()
        log.info("worker %d started (pid %s)", index, process.pid)
        return process, time.monotonic()

    def run(self) -> int:
        """Until SIGINT or SIGTERM; the exit status (3: workers kept dying at startup)."""
        self.workers = [self.start(index) for index in range(self.settings.workers)]
        quick_deaths = 0
        while not self.stopping.wait(0.25):
            for index, (process, started_at) in enumerate(self.workers):
                if process.is_alive():
                    continue
                lived = time.monotonic() - started_at
                quick_deaths = quick_deaths + 1 if lived < STARTUP_S else 0
                if quick_deaths > self.settings.workers:
                    log.error("workers keep exiting at startup (see above): stopping")
                    self.stop()
                    return 3
                log.warning(
                    "worker %d (pid %s) exited with status %s after %.0f s: restarting",
                    index,
                    process.pid,
                    process.exitcode,
                    lived,
                )
                self.workers[index] = self.start(index)
        self.stop()
        return 0

    def stop(self) -> None:
        processes = [process for process, _ in self.workers]
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + GRACE_S + 5
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                process.join()


def supervise(settings: Settings, log_config: dict[str, Any] | None = None) -> None:
    """Serve with settings.workers processes on settings.host:settings.port (module doc)."""
    configure_logging(settings.log_level, settings.secrets(), settings.log_format)
    warning = shared_state_warning(settings)
    if warning:
        log.warning(warning)
    try:
        reserved = shared_port_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, exc)
        sys.exit(3)
    with reserved:
        supervisor = Supervisor(settings, reserved.getsockname()[1], log_config)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: supervisor.stopping.set())
        log.info(
            "serving on %s:%d with %d workers",
            settings.host,
            supervisor.port,
            settings.workers,
        )
        status = supervisor.run()
    if status:
        sys.exit(status)
