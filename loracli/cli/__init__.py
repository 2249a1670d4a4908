"""The `loracli` command line (console script `loracli = "loracli.cli:main"`).

Contract:
- Commands are thin: parse the flags -> one library call -> print. One module per command
  (`run`, `inspect` for `inspect-adapter`, `bench`); no logic of the library lives here.
- Results and `--json` documents go to stdout; logs, progress and summaries to stderr.
- One error handler, `main`: a `LoracliError` becomes one line on stderr, `error: ...`, with its
  `exit_code` (2 for usage or config errors). Library errors name configuration fields
  (`error.fields`); `flags.describe` rewrites those into the flags the user typed. A usage error
  (unknown option or command, bad value for a typed option, missing argument) is one line too,
  with a hint, exit 2: `error: no such option: --max-lora (...); try loracli run --help` (click
  runs with `standalone_mode=False`, so its boxed message is never printed). Any other exception
  is one line too, exit 2. Tracebacks only with `LORACLI_DEBUG=1`.
- `loracli run` exits 1 when some records failed; a signal exits with the signal's status.
- `loracli --help` stays fast: this package imports typer and rich only; torch, the engine and
  the job are imported inside the command bodies.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import LoracliError
from .bench import bench_command
from .flags import describe
from .inspect import inspect_adapter_command
from .run import LOCAL_RAY, optional_ray_address, run_command

__all__ = ["LOCAL_RAY", "app", "main", "optional_ray_address"]

# click's error classes as typer raises them (since typer 0.29 its own copy of click, before it click itself)
ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Serve many LoRA adapters of one base model at once, in batch.",
)


@app.callback()
def _root() -> None:
    """loracli: one base model, many LoRA adapters, one batched engine."""


app.command("run")(run_command)
app.command("inspect-adapter")(inspect_adapter_command)
app.command("bench")(bench_command)


def click_error_line(error: Exception) -> str:
    """A click error as one line; a usage error ends with a hint: `no such option: --x; try loracli run --help`."""
    message = " ".join(error.format_message().split()).rstrip(".")
    if message[1:2].islower():
        message = message[0].lower() + message[1:]
    if not isinstance(error, UsageError):
        return message
    command = error.ctx.command_path if error.ctx is not None else "loracli"
    return f"{message}; try {command} --help"


def main() -> None:
    """The console script: run the app; the one place errors become a line on stderr and an exit status."""
    debug = os.environ.get("LORACLI_DEBUG") == "1"
    err = Console(stderr=True)
    try:
        status = app(args=optional_ray_address(sys.argv[1:]), prog_name="loracli", standalone_mode=False)
    except ClickError as e:
        if type(e).__name__ != "NoArgsIsHelpError":  # `loracli` alone: typer printed the help already
            err.print(f"[red]error:[/red] {escape(click_error_line(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except LoracliError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(describe(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the one handler: a line, or the traceback with LORACLI_DEBUG=1
        if debug:
            raise
        err.print(
            f"[red]error:[/red] {escape(f'{type(e).__name__}: {e}')} (LORACLI_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)  # a command's `typer.Exit(code)` comes back as its code
