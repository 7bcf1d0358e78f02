"""`gateway serve`: every option of the server in this one function, `serve()`; settings come
from the environment, the options go on top (a bad value of either: one line, exit 2)."""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Annotated

import typer

from gateway.catalog import CatalogError, load_catalog
from gateway.cli.inspect import load_settings
from gateway.cli.options import ConfigOption
from gateway.cli.output import CliError, RuntimeFailure


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on.", show_default="$HOST, else 127.0.0.1"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="TCP port.", show_default="$PORT, else 8000"),
    ] = None,
    config: ConfigOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=256,
            help="Worker processes, one per core the gateway may use (share state via REDIS_URL).",
            show_default="$WORKERS, else 1",
        ),
    ] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(
            case_sensitive=False,
            help="Log lines as text, or one JSON object per line.",
            show_default="$LOG_FORMAT, else text",
        ),
    ] = None,
) -> None:
    """Run the HTTP gateway (OpenAI API, /admin, /metrics)."""
    overrides = {
        name: value
        for name, value in (
            ("host", host),
            ("port", port),
            ("workers", workers),
            ("log_format", log_format.value if log_format else None),
        )
        if value is not None
    }
    settings = load_settings(config, **overrides)
    try:
        load_catalog(settings.gateway_config)  # fail fast, with the file and field named
    except CatalogError as exc:
        raise CliError(str(exc)) from None
    from uvicorn.config import LOGGING_CONFIG

    from gateway.api.serving import serve as run_server

    log_config = copy.deepcopy(LOGGING_CONFIG)
    if settings.log_format == "json":  # uvicorn's own lines too, from the first one
        for formatter in log_config["formatters"].values():
            formatter.clear()
            formatter["()"] = "gateway.logging_setup.JsonFormatter"
    try:
        # uvicorn with our hardened httptools protocol: the server limits from settings (header
        # and body timeouts, header size, connections and in-flight requests), a response in one
        # write, the access log only when its level shows it; N workers on one socket when asked
        run_server(settings, log_config=log_config)
    except SystemExit as exc:  # uvicorn exits 3 when it cannot start (port taken, bad host)
        if exc.code not in (0, None):
            where = f"{settings.host}:{settings.port}"
            raise RuntimeFailure(f"the server could not start on {where} (see above)") from None
