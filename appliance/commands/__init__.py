"""The `appliance` subcommands, by concern (`setup`, `runs`, `view`), and what they share; `appliance.cli`
puts them all on one group and owns the process (error lines, signals, the offline guard)."""

from __future__ import annotations

import click


def open_store(ctx: click.Context, readonly: bool = False):
    from ..store import Store

    return Store(ctx.obj["db"], readonly=readonly)


def open_registry(store):
    from ..models.registry import Registry

    return Registry(store)


def prefix(ctx: click.Context) -> str:
    """`appliance`, or `appliance --db PATH` when the database is not the default: every command the CLI
    prints for the user to run names the database it was given."""
    from ..store import command_prefix

    return command_prefix(ctx.obj["db"])


def hint(ctx: click.Context, run_id: int | str = "RUN_ID") -> str:
    """The report/browse line (`appliance.views.report.hint`), imported only when printed."""
    from ..views import report

    return report.hint(run_id, prefix(ctx))
