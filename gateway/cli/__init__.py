"""The `gateway` command (Typer + Rich): serve, routes, cheapest.

    gateway serve [--host H] [--port P] [--config pricing.yaml] [--log-format text|json]
    gateway routes [--config PATH] [--json]
    gateway cheapest --model M --prompt-tokens N [--max-tokens K] [--config PATH] [--json]

Exit status: 0 done; 1 a runtime failure (the port is taken, the server stopped on an error);
2 bad input: an option, pricing.yaml (unreadable, not UTF-8, empty, invalid: the message names
the file and the field), a setting from the environment, an unknown model. Every error is one
line on stderr, never a traceback. A reader that stops early (`gateway routes | head -1`) ends
the command quietly with status 0; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib import metadata
from typing import Annotated

import typer

from gateway.cli import inspect
from gateway.cli.options import EXIT_CODES, MAX_TOKENS, ConfigOption, JsonOption
from gateway.cli.output import CliError, OutputClosed, RuntimeFailure
from gateway.cli.serve import serve

app = typer.Typer(
    name="gateway",
    help="One OpenAI-compatible endpoint in front of every route to WizardLM-2 8x22B.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("moe-gateway")
        except metadata.PackageNotFoundError:  # run from a checkout that was never installed
            version = "unknown (not installed)"
        print(f"gateway (moe-gateway) {version}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, help="Print the version."),
    ] = False,
) -> None:
    """One OpenAI-compatible endpoint in front of every route to WizardLM-2 8x22B."""


app.command(
    epilog="Example: [bold]gateway serve --host 0.0.0.0 --port 8000[/]\n\n" + EXIT_CODES,
)(serve)


@app.command(
    epilog="Examples: [bold]gateway routes[/] · [bold]gateway routes --json | jq .routes[0][/]"
    "\n\n" + EXIT_CODES,
)
def routes(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every route with its effective price, context, status and uptime."""
    inspect.show_routes(config, as_json)


@app.command(
    epilog="Example: [bold]gateway cheapest -m wizardlm-2-8x22b --prompt-tokens 3000 "
    "--max-tokens 500[/]\n\n" + EXIT_CODES,
)
def cheapest(
    model: Annotated[str, typer.Option("--model", "-m", help="A model id or alias.")],
    prompt_tokens: Annotated[
        int, typer.Option(min=0, max=MAX_TOKENS, help="Tokens in the prompt.")
    ],
    max_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_TOKENS,
            help="Completion tokens to price and fit.",
            show_default="each provider's default",
        ),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Routes ranked by cost for a token mix, with the traffic share the server gives each."""
    inspect.show_cheapest(config, model, prompt_tokens, max_tokens, as_json)


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the exit flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _error(message: str) -> int:
    one_line = " ".join(message.split())
    with contextlib.suppress(BrokenPipeError, ValueError):  # stderr closed too: nothing to do
        print(f"gateway: error: {one_line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="gateway", standalone_mode=False)
    except typer.TyperException as exc:  # Typer's (vendored click's) usage errors
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())  # `gateway` alone: the help, as a usage error
            return 2
        where = f"{ctx.command_path}: " if ctx is not None else ""
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        return _error(f"{where}{message} (see --help)")
    except CliError as exc:
        return _error(str(exc))
    except RuntimeFailure as exc:
        _error(str(exc))
        return 1
    except (OutputClosed, BrokenPipeError):
        _quiet_stdout()
        return 0
    except (typer.Abort, KeyboardInterrupt):
        return 130  # Ctrl-C
    return result if isinstance(result, int) else 0
