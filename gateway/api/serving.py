"""How `gateway serve` runs the app: uvicorn, one process or N worker processes.

    serve(settings)                    # settings.workers == 1: the app in this process
    serve(settings)                    # N > 1: workers.py's supervisor and N workers on the port

One worker is one event loop on one core: Python runs the gateway's work on one thread, so a
second core only helps through a second process. With `workers` > 1 each worker accepts on its
own SO_REUSEPORT socket of the port, so the kernel spreads connections evenly (workers.py says
why uvicorn's shared socket did not), and the supervisor restarts a worker that dies. Each
worker builds its own app from the same settings, command-line options included.

What the workers share: nothing in memory. Route health, circuit state, usage and run-time
price overrides are shared only through Redis (`REDIS_URL`); without it each worker routes on
what it alone has seen and reports only its own usage, so `serve` warns. Choosing N: one per
core the gateway may use, leaving the cores that other work on the machine needs (the upstream
calls are network waits, not CPU, so more workers than cores only adds switching); see
docs/benchmarks.md for measured scaling.

Logging: the default level is `warning`. At `info` uvicorn's access log writes one line per
request, which cost ~1.4x the CPU of a request on the 2-core bench machines (issue 13), so it is
on only when the level asks for it (uvicorn formats each line's arguments before the logger
looks at its level, so a hidden access log would still cost).
"""

from __future__ import annotations

from typing import Any

from gateway.api.http_server import access_log_enabled
from gateway.api.workers import shared_state_warning, supervise, uvicorn_options, worker_app
from gateway.settings import Settings

__all__ = ["access_log_enabled", "serve", "shared_state_warning", "uvicorn_options", "worker_app"]


def serve(settings: Settings, log_config: dict[str, Any] | None = None) -> None:
    """Run the gateway until interrupted (`log_config`: uvicorn's logging dictConfig)."""
    import uvicorn

    if settings.workers > 1:
        supervise(settings, log_config)
        return
    options = uvicorn_options(settings)
    if log_config is not None:
        options["log_config"] = log_config
    uvicorn.run(worker_app(settings), **options)
