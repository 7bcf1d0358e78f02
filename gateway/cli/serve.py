"""`gateway serve`: every option of the server in one function, `serve()`; settings from the
environment, then the options on top (a bad value of either is one line and exit 2)."""

from __future__ import annotations

import copy
from pathlib import Path

from gateway.catalog import CatalogError, load_catalog
from gateway.cli.inspect import load_settings
from gateway.cli.output import CliError, RuntimeFailure


def serve(
    host: str | None,
    port: int | None,
    config: Path | None,
    log_format: str | None,
) -> None:
    overrides = {
        name: value
        for name, value in (("host", host), ("port", port), ("log_format", log_format))
        if value is not None
    }
    settings = load_settings(config, **overrides)
    try:
        load_catalog(settings.gateway_config)  # fail fast, with the file and field named
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from gateway.api.app import create_app
    from gateway.api.http_server import GatewayHttpProtocol

    log_config = copy.deepcopy(LOGGING_CONFIG)
    if settings.log_format == "json":  # uvicorn's own lines too, from the first one
        for formatter in log_config["formatters"].values():
            formatter.clear()
            formatter["()"] = "gateway.logging_setup.JsonFormatter"
    try:
        uvicorn.run(
            create_app(settings),
            log_config=log_config,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            # uvicorn builds every access-log line's arguments before the logger checks its
            # level: when the level hides INFO, nothing would be written, so leave it undone.
            access_log=settings.log_level in ("info", "debug", "trace"),
            http=GatewayHttpProtocol,  # uvicorn's httptools protocol, a response in one write
        )
    except SystemExit as exc:  # uvicorn exits 3 when it cannot start (port taken, bad host)
        if exc.code not in (0, None):
            where = f"{settings.host}:{settings.port}"
            raise RuntimeFailure(f"the server could not start on {where} (see above)") from None
