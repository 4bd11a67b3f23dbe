"""Commands before any run: `db` (path, check, backup), `models` (add, list, inspect, remove), `hw` and `plan`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import open_registry, open_store, prefix


def _bytes(n: int | None) -> str:
    from ..plan.estimate import format_bytes  # (imports gguf and numpy: not at the CLI's start)

    return "-" if n is None else format_bytes(n)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------- db
@click.group()
def db() -> None:
    """The SQLite database."""


@db.command("path")
@click.pass_context
def db_path(ctx: click.Context) -> None:
    """Print the database file's path."""
    click.echo(str(Path(ctx.obj["db"]).resolve()))


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Integrity check and row counts per run; exits 1 if SQLite reports damage."""
    from ..runs.queries import list_runs

    store = open_store(ctx, readonly=True)
    problems = [r["integrity_check"] for r in store.rows("PRAGMA integrity_check")]
    click.echo(f"integrity    {'ok' if problems == ['ok'] else '; '.join(problems[:5])}")
    click.echo(f"schema       version {store.schema_version()}")
    for table in ("models", "prompts", "runs", "generations"):
        click.echo(f"{table:<12} {store.rows(f'SELECT count(*) AS n FROM {table}')[0]['n']} rows")
    for row in list_runs(store, limit=0):
        click.echo(f"run {row['id']:>4}     {row['kind']:<9} {row['status']:<11} {row['counts']}")
    if problems != ["ok"]:
        sys.exit(1)


@db.command("backup")
@click.argument("target", type=click.Path(path_type=Path))
@click.pass_context
def db_backup(ctx: click.Context, target: Path) -> None:
    """Write a consistent copy of the database to TARGET (VACUUM INTO), safe while a run is writing."""
    open_store(ctx, readonly=True).backup(target)
    click.echo(f"backed up to {target}")


# ----------------------------------------------------------------------------------------- models
@click.group()
def models() -> None:
    """Register and inspect GGUF model files (also found under ./models/ and the demo package)."""


@models.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name to use instead of the file name.")
@click.pass_context
def models_add(ctx: click.Context, path: Path, name: str | None) -> None:
    """Register the GGUF file at PATH."""
    store = open_store(ctx)
    registry = open_registry(store)
    record = registry.register(path, name=name, origin="added")
    registry.ensure_sha256(record)
    click.echo(f"added {record.name}: {record.info.architecture} {record.info.file_type or ''} {record.path}")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per model.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List registered models."""
    records = open_registry(open_store(ctx)).list()
    if as_json:
        for r in records:
            click.echo(json.dumps(_model_summary(r)))
        return
    if not records:
        click.echo(f"no models: `{prefix(ctx)} models add PATH`, or put .gguf files under ./models/")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("name", "arch", "params", "quant", "ctx", "size", "origin", "path"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.name,
            r.info.architecture,
            _count(r.info.n_params),
            r.info.file_type or "-",
            str(r.info.context_length or "-"),
            _bytes(r.file_size),
            r.origin if r.exists else "missing",
            r.path,
        )
    Console(width=max(120, click.get_terminal_size()[0]) if sys.stdout.isatty() else 200).print(table)


def _model_summary(r) -> dict[str, Any]:
    i = r.info
    return {
        "name": r.name,
        "path": r.path,
        "origin": r.origin,
        "architecture": i.architecture,
        "n_params": i.n_params,
        "file_type": i.file_type,
        "context_length": i.context_length,
        "file_size": r.file_size,
        "sha256": r.sha256,
    }


@models.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@click.pass_context
def models_inspect(ctx: click.Context, model: str, as_json: bool) -> None:
    """Show a model's metadata: MODEL is a registered name or a path to a .gguf file."""
    registry = open_registry(open_store(ctx))
    record = registry.resolve(model)
    sha = registry.ensure_sha256(record)
    i = record.info
    data = {
        "name": record.name,
        "path": record.path,
        "sha256": sha,
        "file_size": record.file_size,
        **{k: v for k, v in i.model_dump().items() if k not in ("path", "file_size", "metadata", "layer_bytes")},
        "metadata": i.metadata,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [
        ("name", record.name),
        ("path", record.path),
        ("architecture", i.architecture),
        ("model name", i.name or "-"),
        ("parameters", f"{i.n_params:,} ({_count(i.n_params)})"),
        ("quantization", i.file_type or "-"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(i.tensor_types.items(), key=lambda kv: -kv[1]))),
        ("trained context", str(i.context_length or "-")),
        ("layers", str(i.block_count)),
        ("heads", str(i.head_count)),
        ("KV heads", str(i.head_count_kv)),
        ("head size", f"{i.key_length} (key) / {i.value_length} (value)"),
        ("embedding", str(i.embedding_length)),
        ("sliding window", str(i.sliding_window or "-")),
        ("vocabulary", f"{i.vocab_size:,}"),
        ("chat template", "yes" if i.chat_template else "no (completion mode)"),
        ("file size", f"{_bytes(record.file_size)} ({record.file_size:,} bytes)"),
        ("weights", _bytes(i.weights_bytes)),
        ("sha256", sha),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


@models.command("remove")
@click.argument("name")
@click.pass_context
def models_remove(ctx: click.Context, name: str) -> None:
    """Forget a registered model (the file stays; its runs keep their history)."""
    record = open_registry(open_store(ctx)).remove(name)
    click.echo(f"removed {record.name} ({record.path} is untouched)")


# ------------------------------------------------------------------------------------------- hw
@click.command("hw")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def hw(as_json: bool) -> None:
    """What this machine has: CPU, RAM (and cgroup limit), GPUs and free VRAM, llama.cpp GPU support."""
    from ..plan.hardware import detect_hardware

    info = detect_hardware()
    if as_json:
        click.echo(info.model_dump_json(indent=2))
        return
    click.echo(f"CPU        {info.cpu_physical_cores} cores, {info.cpu_threads} threads")
    click.echo(f"RAM        {_bytes(info.ram_available_bytes)} available of {_bytes(info.ram_total_bytes)}")
    if info.cgroup_limit_bytes:
        click.echo(f"cgroup     limit {_bytes(info.cgroup_limit_bytes)}, in use {_bytes(info.cgroup_usage_bytes)}")
    click.echo(f"usable     {_bytes(info.effective_available_bytes)}")
    if not info.gpus:
        click.echo("GPUs       none found")
    for g in info.gpus:
        click.echo(f"GPU {g.index}      {g.name} ({g.backend}): {_bytes(g.vram_free_bytes)} free of {_bytes(g.vram_total_bytes)}")
    click.echo(f"llama.cpp  {info.llama_cpp_version}, GPU offload {'supported' if info.gpu_offload_supported else 'not in this build (CPU only)'}")


# ----------------------------------------------------------------------------------------- plan
@click.command("plan")
@click.argument("model")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), help="Context size in tokens (all sequences together).")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), help="Sequences decoded together.")
@click.option("--gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), help="Layers on the GPU (-1: all; default: as many as fit).")
@click.option("--allow-long-context", is_flag=True,
              help="Keep a --ctx beyond the model's trained context (risk: past it, most models repeat themselves or write nonsense).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def plan_cmd(ctx: click.Context, model: str, n_ctx: int | None, n_parallel: int | None, n_gpu_layers: int | None,
             allow_long_context: bool, as_json: bool) -> None:
    """Estimate the memory MODEL needs here and choose GPU layers, context and parallel sequences.

    Exits 1 when it does not fit, with what would."""
    from ..plan.hardware import detect_hardware
    from ..plan.planner import make_plan

    record = open_registry(open_store(ctx)).resolve(model)
    plan = make_plan(record.info, detect_hardware(), n_ctx=n_ctx, n_parallel=n_parallel, n_gpu_layers=n_gpu_layers,
                     allow_long_context=allow_long_context)
    if as_json:
        click.echo(json.dumps({"model": record.name, **plan.model_dump()}, indent=2))
    else:
        _print_plan(record.name, plan)
    plan.require()  # does not fit: one line on stderr, exit 1


def _print_plan(name: str, plan) -> None:
    click.echo(f"model        {name}")
    click.echo(f"weights      {_bytes(plan.weights_bytes)}")
    click.echo(f"KV cache     {_bytes(plan.kv_cache_bytes)} ({plan.type_k}/{plan.type_v})")
    click.echo(f"compute      {_bytes(plan.compute_bytes)}")
    click.echo(f"other        {_bytes(plan.other_bytes)}")
    click.echo(f"total        {_bytes(plan.total_bytes)} (RAM {_bytes(plan.cpu_bytes)}, GPU {_bytes(plan.gpu_bytes)})")
    click.echo(f"available    {_bytes(plan.available_bytes)} RAM" + (f", {_bytes(plan.gpu_available_bytes)} GPU" if plan.gpu_available_bytes else "") + f" (margin {_bytes(plan.margin_bytes)})")
    click.echo(f"settings     ctx {plan.n_ctx}, parallel {plan.n_parallel}, gpu layers {plan.n_gpu_layers}, threads {plan.n_threads}, batch {plan.n_batch}")
    for line in plan.adjustments:
        click.echo(f"changed      {line}")
    click.echo(f"verdict      {plan.verdict}")
    for line in plan.suggestions:
        click.echo(f"  try        {line}")


COMMANDS = (db, models, hw, plan_cmd)
