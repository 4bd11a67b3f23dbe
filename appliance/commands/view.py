"""Commands that look at what the database holds: `logs`, `runs`, `browse` (Datasette) and `report` (one HTML page)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import hint, open_store


# ----------------------------------------------------------------------------------------- logs
@click.command("logs")
@click.option("-n", "--count", "limit", type=click.IntRange(min=0), default=3, show_default=True, help="How many outputs (0: all).")
@click.option("-q", "--query", help="Full-text search over outputs and prompts.")
@click.option("--run", "run_ref", metavar="RUN", help="Only this run: its id, `last`, or a run name.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def logs(ctx: click.Context, limit: int, query: str | None, run_ref: str | None, as_json: bool) -> None:
    """Show logged generations, newest first."""
    from ..runs.queries import item_label, item_variables, resolve_run, search_generations

    store = open_store(ctx, readonly=True)
    run_id = resolve_run(store, run_ref) if run_ref is not None else None
    rows = search_generations(store, limit=limit, query=query, run_id=run_id)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, ensure_ascii=False))
            continue
        prompt = f"  {row['prompt']}" if row["prompt"] else ""
        click.echo(
            f"## run {row['run_id']} {item_label(row['item_index'], row['variables'])}  {row['model'] or '-'}{prompt}  seed {row['seed']}  "
            f"{row['tokens_in']}+{row['tokens_out']} tokens  {row['ms']} ms  {row['finish_reason']}  {row['created_at']}"
        )
        made_for = item_variables(row["variables"])
        if made_for:
            click.echo(f"(for {made_for})")
        click.echo(row["output"].strip("\n"))
        click.echo()
    if not rows and not as_json:
        click.echo("no generations match", err=True)


@click.command("runs")
@click.option("-n", "--count", "limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many runs (0: all).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def runs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List runs with their status and counts."""
    from ..runs.queries import list_runs

    rows = list_runs(open_store(ctx, readonly=True), limit=limit)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
        else:
            dropped = ", ".join(f"{k} {v}" for k, v in sorted(row["dropped"].items()))
            click.echo(
                f"run {row['id']:>4}  {row['kind']:<9} {row['status']:<11} {row['counts']}"
                + (f" (dropped: {dropped})" if dropped else "")
                + f"  {row['name'] or row['prompt'] or '-'}  {row['model'] or '-'}  {row['started_at']}"
                + (f"  error: {row['error']}" if row["error"] else "")
            )
            if row["next"]:
                click.echo(f"           {row['next']}")
    if not rows and not as_json:
        click.echo("no runs yet", err=True)
    elif not as_json:
        click.echo(hint(ctx), err=True)



# ------------------------------------------------------------------------------------- see the data
@click.command("browse")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open it in the default web browser.")
@click.pass_context
def browse_cmd(ctx: click.Context, port: int, open_browser: bool) -> None:
    """Browse the database in Datasette: read-only, on 127.0.0.1 only, offline, with table descriptions,
    facets and canned queries (runs, drops per filter, label balance, evaluations, output search)."""
    from ..views.browse import serve

    db = Path(ctx.obj["db"])
    serve(db, port, open_browser, on_ready=lambda url: click.echo(f"serving {db} read-only at {url} (Ctrl-C stops)", err=True))


@click.command("report")
@click.argument("run_ref", metavar="RUN")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="The HTML file to write.")
@click.pass_context
def report_cmd(ctx: click.Context, run_ref: str, out: Path) -> None:
    """Write one self-contained HTML page about RUN (an id, `last`, or a run name): plots (lengths, drops per
    filter, label balance, echo and grounding measures, speed, student scores) and kept and dropped examples."""
    from ..runs.queries import resolve_run
    from ..views.report import write_report

    store = open_store(ctx, readonly=True)
    run_id = resolve_run(store, run_ref)
    report = write_report(store, run_id, out)
    click.echo(f"run {run_id}: {len(report.plots)} plots, {len(report.kept) + len(report.dropped)} samples -> {out}")
    if report.notice:
        click.echo(report.notice, err=True)


COMMANDS = (logs, runs, browse_cmd, report_cmd)
