"""How the `gateway` command writes: Rich tables that fit 100 columns (numbers right-aligned),
JSON, and one-line errors.

Everything goes through `emit()`, the one place that turns a closed pipe (`gateway routes |
head -1`) into `OutputClosed`, which `main()` ends quietly instead of a BrokenPipeError.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import textwrap
from typing import Any

from rich.console import Console, RenderableType

MAX_WIDTH = 100  # tables never get wider than this, whatever the terminal


class CliError(Exception):
    """Bad input (an option, pricing.yaml, a setting, an unknown model): one line, exit 2."""


class RuntimeFailure(Exception):
    """The command could not do its work (e.g. the server could not bind its port): exit 1."""


class OutputClosed(Exception):
    """Whoever reads our output has gone (a closed pipe): stop writing, exit quietly."""


def emit(text: str) -> None:
    line = text if text.endswith("\n") else text + "\n"
    try:
        try:
            sys.stdout.write(line)
        except UnicodeEncodeError:  # e.g. PYTHONIOENCODING=ascii: "—" and "²" become "?"
            encoding = sys.stdout.encoding or "ascii"
            sys.stdout.write(line.encode(encoding, "replace").decode(encoding))
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed() from None


def note(text: str) -> None:
    """A line of prose under a table, wrapped to the same width."""
    emit(textwrap.fill(text, width=width(), subsequent_indent="  ", break_on_hyphens=False))


def emit_json(data: Any) -> None:
    emit(json.dumps(data, indent=2))  # ASCII escapes: valid JSON whatever the encoding


def width() -> int:
    """The terminal's width (COLUMNS when set), at most MAX_WIDTH; MAX_WIDTH when piped."""
    return min(MAX_WIDTH, shutil.get_terminal_size((MAX_WIDTH, 24)).columns)


def render(*items: RenderableType) -> str:
    """Rich renderables as text: colour only when stdout is a terminal (NO_COLOR honoured)."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width(),
        force_terminal=sys.stdout.isatty(),
        highlight=False,
        soft_wrap=False,
    )
    for item in items:
        console.print(item)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def price(value: float) -> str:
    """USD per 1M tokens: two decimals, more only when needed."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.4g}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def count(value: int) -> str:
    return f"{value:,}"
