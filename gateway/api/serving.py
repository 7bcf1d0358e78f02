"""How `gateway serve` runs the app: uvicorn, one process or N worker processes.

    serve(settings)                    # settings.workers == 1: the app in this process
    serve(settings, config_path=PATH)  # N > 1: uvicorn's supervisor and N workers on one socket

One worker is one event loop on one core: Python runs the gateway's work on one thread, so a
second core only helps through a second process. With `workers` > 1 uvicorn's supervisor binds
the socket once, starts N spawned processes that accept on it, and restarts a worker that dies.
Each worker builds its own app from the environment (`worker_app`), so whatever the command line
set (the pricing.yaml path) is passed down through the environment before they start.

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

import logging
import os
from pathlib import Path
from typing import Any

from gateway.api.http_server import access_log_enabled
from gateway.api.http_server import uvicorn_options as server_options
from gateway.settings import Settings

__all__ = ["access_log_enabled", "serve", "shared_state_warning", "uvicorn_options", "worker_app"]

log = logging.getLogger("gateway.serve")

WORKER_APP = "gateway.api.serving:worker_app"


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options `gateway serve` uses, one process or many: the hardened protocol
    with the server limits from settings (http_server.uvicorn_options), host and port."""
    options = {"host": settings.host, "port": settings.port, "timeout_graceful_shutdown": 10}
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


def worker_app() -> Any:
    """The app of one worker process (uvicorn's factory): settings from the environment."""
    from gateway.api.app import create_app

    app = create_app(Settings())
    app.tune_gc = True  # this process serves: collector out of the request path
    return app


def serve(
    settings: Settings, config_path: Path | None = None, log_config: dict[str, Any] | None = None
) -> None:
    """Run the gateway until interrupted. `config_path`: a --config given on the command line
    (the workers read it from GATEWAY_CONFIG); `log_config`: uvicorn's logging dictConfig."""
    import uvicorn

    options = uvicorn_options(settings)
    if log_config is not None:
        options["log_config"] = log_config
    if settings.workers == 1:
        from gateway.api.app import create_app

        app = create_app(settings)
        app.tune_gc = True  # this process serves: collector out of the request path
        uvicorn.run(app, **options)
        return
    warning = shared_state_warning(settings)
    if warning:
        logging.basicConfig(format="%(levelname)s: %(message)s")
        log.warning(warning)
    if config_path is not None:
        # Spawned workers inherit this process's environment; Settings() reads it there.
        os.environ["GATEWAY_CONFIG"] = str(Path(config_path).resolve())
    uvicorn.run(WORKER_APP, factory=True, workers=settings.workers, **options)
