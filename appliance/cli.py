"""The `appliance` command line: parse, call the library, print. No logic of its own.

This module owns the group, its one-line errors and the console entry point; the subcommands live in
`appliance.commands` (`setup`, `runs`, `view`).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import offline
from .version import VERSION as __version__
from .commands import runs, setup, view
from .errors import ApplianceError, RunInterrupted


class ApplianceGroup(click.Group):
    """Turns ApplianceError (and any other failure) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:
            _fail(str(exc), exc.exit_code)
        except RunInterrupted as exc:
            _fail(exc.message, 130)
        except KeyboardInterrupt:
            from .store import command_prefix

            runs_cmd = f"{command_prefix(ctx.obj['db'])} runs" if ctx.obj else "appliance runs"
            _fail(f"interrupted: rows written so far are kept; `{runs_cmd}` shows how to continue a run", 130)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: still one line, with the way to see the traceback
            if os.environ.get("APPLIANCE_DEBUG"):
                traceback.print_exc()
            _fail(f"internal error: {type(exc).__name__}: {exc} (set APPLIANCE_DEBUG=1 for the traceback)", 1)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM stops like Ctrl-C: the run is marked interrupted, the rows written stay."""
    raise KeyboardInterrupt


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (`appliance logs --json | head`): stop without a word and with exit
    status 141, as Unix tools killed by SIGPIPE do; stdout goes to /dev/null so the flush at exit is quiet too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    sys.exit(141)


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


@click.group(cls=ApplianceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    type=click.Path(dir_okay=True, path_type=Path),
    envvar="APPLIANCE_DB",
    default="appliance.db",
    show_default=True,
    help="SQLite database file (or set APPLIANCE_DB).",
)
@click.version_option(__version__, prog_name="appliance")
@click.pass_context
def cli(ctx: click.Context, db: Path) -> None:
    """Turn local GGUF models into training datasets, fully offline; every prompt and output is logged
    in one SQLite file you can query with sqlite-utils or Datasette."""
    ctx.obj = {"db": db}


for _command in (*setup.COMMANDS, *runs.COMMANDS, *view.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    """The console entry point: the offline guard and the SIGTERM handler belong to the `appliance`
    process, not to whoever imports the package or calls `cli` in-process (tests, notebooks)."""
    offline.install()
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="appliance")


if __name__ == "__main__":
    main()
