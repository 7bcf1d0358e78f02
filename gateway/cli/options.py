"""What the commands' options share: the catalog option, --json, bounds, the exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MAX_TOKENS = 1_000_000_000  # a count above this is a typo, not a prompt: refused, not capped

EXIT_CODES = "Exit status: 0 ok, 1 runtime failure, 2 bad input (options, pricing.yaml, settings)."

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="The pricing catalog (YAML).",
        show_default="$GATEWAY_CONFIG, else the packaged pricing.yaml",
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
