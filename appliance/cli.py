"""The `appliance` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__, offline
from .errors import ApplianceError, RunInterrupted


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return str(n)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


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
            _fail("interrupted: rows written so far are kept; `appliance runs` shows how to continue a run", 130)
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


def _store(ctx: click.Context, readonly: bool = False):
    from .store import Store

    return Store(ctx.obj["db"], readonly=readonly)


def _registry(store):
    from .models import Registry

    return Registry(store)


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


# --------------------------------------------------------------------------------------------- db
@cli.group()
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
    from .logs import list_runs

    store = _store(ctx, readonly=True)
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
    _store(ctx, readonly=True).backup(target)
    click.echo(f"backed up to {target}")


# ----------------------------------------------------------------------------------------- models
@cli.group()
def models() -> None:
    """Register and inspect GGUF model files (also found under ./models/ and the demo package)."""


@models.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name to use instead of the file name.")
@click.pass_context
def models_add(ctx: click.Context, path: Path, name: str | None) -> None:
    """Register the GGUF file at PATH."""
    store = _store(ctx)
    registry = _registry(store)
    record = registry.register(path, name=name, origin="added")
    registry.ensure_sha256(record)
    click.echo(f"added {record.name}: {record.info.architecture} {record.info.file_type or ''} {record.path}")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per model.")
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List registered models."""
    records = _registry(_store(ctx)).list()
    if as_json:
        for r in records:
            click.echo(json.dumps(_model_summary(r)))
        return
    if not records:
        click.echo("no models: `appliance models add PATH`, or put .gguf files under ./models/")
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
    registry = _registry(_store(ctx))
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
    record = _registry(_store(ctx)).remove(name)
    click.echo(f"removed {record.name} ({record.path} is untouched)")


# ------------------------------------------------------------------------------------------- hw
@cli.command("hw")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def hw(as_json: bool) -> None:
    """What this machine has: CPU, RAM (and cgroup limit), GPUs and free VRAM, llama.cpp GPU support."""
    from .hardware import detect_hardware

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
@cli.command("plan")
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
    from .hardware import detect_hardware
    from .planner import make_plan

    record = _registry(_store(ctx)).resolve(model)
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


# ------------------------------------------------------------------------------------- generate
@cli.command("generate")
@click.argument("prompt_file", type=click.Path(path_type=Path))
@click.option("-m", "--model", required=True, help="Model name (see `models list`) or path to a .gguf file.")
@click.option("-n", "--count", type=int, default=1, show_default=True, help="How many outputs to generate.")
@click.option("--var", "variables", multiple=True, metavar="KEY=VALUE", help="Template variable (repeatable).")
@click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature (0: greedy).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus sampling mass.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Most new tokens per output.")
@click.option("--seed", type=click.IntRange(min=0), help="Base seed; each output gets its own seed derived from it.")
@click.option("--json-schema", "schema_file", type=click.Path(path_type=Path), help="Constrain every output to this JSON schema.")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), help="Sequences decoded together (default: the plan's).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), help="Context size (default: what the prompts need).")
@click.option("--gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), help="Layers on the GPU (-1: all).")
@click.option("--mode", type=click.Choice(["auto", "chat", "completion"]), help="Prompt through the model's chat template (chat) or as plain text (completion); default: the file's, else auto.")
@click.option("--chat-template", "chat_template", metavar="NAME|FILE", help="Chat template for GGUFs without one (or with a broken one): chatml, llama3, mistral, gemma, ... or a Jinja2 file.")
@click.option("--json", "as_json", is_flag=True, help="Print each output as a JSON line.")
@click.pass_context
def generate_cmd(ctx: click.Context, prompt_file: Path, model: str, count: int, variables: tuple[str, ...], temperature, top_p, max_tokens, seed, schema_file, n_parallel, n_ctx, n_gpu_layers, mode, chat_template, as_json: bool) -> None:
    """Generate COUNT outputs from PROMPT_FILE with MODEL; each is logged to the database as it completes."""
    from .generate import GenerateOptions, generate
    from .schema import load_json_schema
    from .progress import GenerationProgress, json_row, text_row
    from .prompts import load_prompt, parse_var

    if count <= 0:
        raise ApplianceError(f"-n/--count must be at least 1, got {count}")
    prompt = load_prompt(prompt_file)
    schema = load_json_schema(schema_file) if schema_file else None
    opts = GenerateOptions(
        count=count,
        variables=dict(parse_var(v) for v in variables),
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        n_parallel=n_parallel,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        mode=mode,
        chat_template=chat_template,
    )
    store = _store(ctx)
    registry = _registry(store)
    with GenerationProgress(show=json_row if as_json else text_row) as progress:
        result = generate(store, registry, prompt, model, opts, schema=schema, command=sys.argv[1:], events=progress)
    ex = result.execution
    rate = ex.tokens_out / ex.seconds if ex.seconds else 0.0
    click.echo(
        f"run {result.run_id} ({result.mode} mode): {ex.rows} outputs, {ex.tokens_out} tokens in {ex.seconds:.1f} s "
        f"({rate:.1f} tok/s) -> {store.path}",
        err=True,
    )


# ------------------------------------------------------------------------------------ recipes
@cli.command("run")
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--resume", "resume", type=int, metavar="RUN_ID", help="Continue this run (refused if its recipe or prompt changed).")
@click.option("--new-run", is_flag=True, help="Start a new run even if an unfinished one of this recipe exists.")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), help="Sequences decoded together (default: the plan's).")
@click.option("--quiet", is_flag=True, help="Do not print outputs as they complete.")
@click.option("--mode", type=click.Choice(["auto", "chat", "completion"]), help="Prompt through the model's chat template (chat) or as plain text (completion); default: the recipe's, else auto.")
@click.option("--chat-template", "chat_template", metavar="NAME|FILE", help="Chat template for GGUFs without one (or with a broken one): chatml, llama3, mistral, gemma, ... or a Jinja2 file.")
@click.pass_context
def run_cmd(ctx: click.Context, recipe_file: Path, resume: int | None, new_run: bool, n_parallel: int | None, quiet: bool, mode, chat_template) -> None:
    """Make a dataset from RECIPE_FILE: a recipe (synthetic, annotated, augmented) or a task spec
    (`[[tasks]]`: data for small models). Re-running the file continues its unfinished run."""
    from .datasets import run_recipe
    from .progress import GenerationProgress, text_row
    from .recipe import is_task_spec, load_recipe

    if resume is not None and new_run:
        raise ApplianceError("--resume and --new-run exclude each other")
    if is_task_spec(recipe_file):
        from .taskspec import load_task_spec
        from .tasks import run_task_spec as runner

        loaded = load_task_spec(recipe_file)
    else:
        runner = run_recipe
        loaded = load_recipe(recipe_file)
    store = _store(ctx)
    with GenerationProgress(show=None if quiet else text_row) as progress:
        summary = runner(store, _registry(store), loaded, resume=resume, new_run=new_run, n_parallel=n_parallel,
                         mode=mode, chat_template=chat_template, events=progress)
    _print_summary(summary)
    if summary.kept == 0:
        raise ApplianceError(f"run {summary.run_id} {summary.why_nothing() or 'kept nothing'}")


def _print_summary(s) -> None:
    ex = s.execution
    how = "already complete; --new-run starts another" if s.already_complete else "resumed" if s.resumed else "new"
    if s.kind == "task":
        click.echo(f"run {s.run_id} ({how}): {s.generated} generations, {s.kept} of {s.requested} examples kept", err=True)
    else:
        click.echo(f"run {s.run_id} ({how}): {s.generated}/{s.requested} generated, {s.kept} kept", err=True)
    if ex is not None and ex.seconds:
        click.echo(f"  this session: {ex.rows} outputs, {ex.tokens_out} tokens, {ex.tokens_out / ex.seconds:.1f} tok/s, "
                   f"{s.model_loads} model load{'s' if s.model_loads != 1 else ''}", err=True)
    for name, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]):
        click.echo(f"  dropped by {name}: {n} (e.g. {s.first_reasons[name]})", err=True)
    if s.retried:
        click.echo(f"  empty outputs generated again with a new seed: {s.retried}", err=True)
    for axis, (hit, n) in s.fidelity.items():
        click.echo(f"  fidelity {axis}: {hit} of {n} outputs labelled as asked ({hit / n:.0%})" if n else f"  fidelity {axis}: nothing checked", err=True)
    if s.echo:
        r, o = s.echo["length_ratio"], s.echo["ngram_overlap"]
        click.echo(
            f"  echo: instruction/output length ratio median {r['median']:.2f} (p90 {r['p90']:.2f}, max {r['max']:.2f}); "
            f"3-gram overlap median {o['median']:.0%} (p90 {o['p90']:.0%}, max {o['max']:.0%})",
            err=True,
        )
    for path, reason in s.skipped_sources:
        click.echo(f"  skipped source {path}: {reason}", err=True)
    for line in s.table_lines:
        click.echo(f"  {line}", err=True)
    click.echo(f"  {_hint(s.run_id)}", err=True)


@cli.command("export")
@click.argument("run_ref", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["openai", "sharegpt", "alpaca", "jsonl"]), default="openai", show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output file (with --split: NAME.SPLIT.jsonl beside it).")
@click.option("--split", "split", metavar="NAME=RATIO,...", help="e.g. train=0.9,test=0.1: deterministic, no near-duplicates across splits.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--resplit", is_flag=True, help="Split a run that stored its splits (a task run) again; the card records it.")
@click.pass_context
def export_cmd(ctx: click.Context, run_ref: str, fmt: str, out: Path, split: str | None, seed: int, resplit: bool) -> None:
    """Write the examples of RUN (an id, `last`, or a run name) that passed every filter, and a dataset card beside
    them. A task run's stored splits are kept (one file per split), so no example `eval` tests on is trained on."""
    from .export import export_run
    from .logs import resolve_run

    store = _store(ctx, readonly=True)
    result = export_run(store, resolve_run(store, run_ref), fmt, out, split, seed, resplit=resplit)
    for name, (path, n) in result.files.items():
        click.echo(f"{name}: {n} examples -> {path}")
    click.echo(f"card: {result.card}")


@cli.command("eval")
@click.argument("student")
@click.option("--dataset", "dataset_ref", required=True, metavar="RUN", help="The task run whose held-out split to use: its id, `last`, or its name.")
@click.option("--split", default="test", show_default=True, help="Which split to evaluate on.")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), help="Sequences decoded together (default: the plan's).")
@click.option("--mode", type=click.Choice(["auto", "chat", "completion"]), default="auto", show_default=True, help="Prompt the student through its chat template (chat) or as plain text; auto: chat when it has a template.")
@click.option("--chat-template", "chat_template", metavar="NAME|FILE", help="Chat template for a student GGUF without one.")
@click.option("--json", "as_json", is_flag=True, help="The metrics as one JSON object.")
@click.pass_context
def eval_cmd(ctx: click.Context, student: str, dataset_ref: str, split: str, n_parallel: int | None, mode: str, chat_template, as_json: bool) -> None:
    """Run STUDENT (a GGUF) on a task run's held-out examples with the same prompt and constraints;
    report accuracy and per-label P/R/F1 (classify), JSON validity and per-field exact match (extract)."""
    from .evaluate import evaluate
    from .logs import resolve_run
    from .metrics import format_report
    from .progress import GenerationProgress

    store = _store(ctx)
    dataset_run = resolve_run(store, dataset_ref)
    with GenerationProgress(describe="evaluating") as progress:
        result = evaluate(store, _registry(store), student, dataset_run, split, n_parallel=n_parallel, mode=mode,
                          chat_template=chat_template, events=progress)
    if as_json:
        click.echo(json.dumps({"eval_id": result.eval_id, "run_id": result.run_id, "n": result.n, "tasks": result.reports}, indent=2))
        return
    click.echo(f"eval {result.eval_id} (run {result.run_id}): {result.n} examples of run {dataset_run}/{split}")
    for name, report in result.reports.items():
        click.echo(f"\n## {name} ({result.kinds[name]})")
        click.echo(format_report(report, result.kinds[name]))


@cli.command("evals")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def evals_cmd(ctx: click.Context, as_json: bool) -> None:
    """Compare evaluation results across students and datasets."""
    from .evaluate import headline, list_evals

    rows = list_evals(_store(ctx, readonly=True))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no evaluations yet: `appliance eval STUDENT --dataset RUN_ID`", err=True)
        return
    for row in rows:
        scores = "  ".join(f"{task}: {headline(m)}" for task, m in sorted(row["metrics"].items()))
        click.echo(f"eval {row['id']:>3}  {row['student']:<24} on run {row['dataset_run_id']} ({row['dataset']}/{row['split']}, n={row['n']})  {scores}")


# ----------------------------------------------------------------------------------------- logs
@cli.command("logs")
@click.option("-n", "--count", "limit", type=click.IntRange(min=0), default=3, show_default=True, help="How many outputs (0: all).")
@click.option("-q", "--query", help="Full-text search over outputs and prompts.")
@click.option("--run", "run_ref", metavar="RUN", help="Only this run: its id, `last`, or a run name.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def logs(ctx: click.Context, limit: int, query: str | None, run_ref: str | None, as_json: bool) -> None:
    """Show logged generations, newest first."""
    from .logs import item_label, resolve_run, search_generations

    store = _store(ctx, readonly=True)
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
        click.echo(row["output"].strip("\n"))
        click.echo()
    if not rows and not as_json:
        click.echo("no generations match", err=True)


@cli.command("runs")
@click.option("-n", "--count", "limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many runs (0: all).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def runs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """List runs with their status and counts."""
    from .logs import list_runs

    rows = list_runs(_store(ctx, readonly=True), limit=limit)
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
        click.echo(_hint(), err=True)


def _hint(run_id: int | str = "RUN_ID") -> str:
    from .report import hint

    return hint(run_id)


# ------------------------------------------------------------------------------------- see the data
@cli.command("browse")
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open it in the default web browser.")
@click.pass_context
def browse_cmd(ctx: click.Context, port: int, open_browser: bool) -> None:
    """Browse the database in Datasette: read-only, on 127.0.0.1 only, offline, with table descriptions,
    facets and canned queries (runs, drops per filter, label balance, evaluations, output search)."""
    from .browse import serve

    db = Path(ctx.obj["db"])
    serve(db, port, open_browser, on_ready=lambda url: click.echo(f"serving {db} read-only at {url} (Ctrl-C stops)", err=True))


@cli.command("report")
@click.argument("run_ref", metavar="RUN")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="The HTML file to write.")
@click.pass_context
def report_cmd(ctx: click.Context, run_ref: str, out: Path) -> None:
    """Write one self-contained HTML page about RUN (an id, `last`, or a run name): plots (lengths, drops per
    filter, label balance, echo and grounding measures, speed, student scores) and kept and dropped examples."""
    from .logs import resolve_run
    from .report import write_report

    store = _store(ctx, readonly=True)
    run_id = resolve_run(store, run_ref)
    report = write_report(store, run_id, out)
    click.echo(f"run {run_id}: {len(report.plots)} plots, {len(report.kept) + len(report.dropped)} samples -> {out}")
    if report.notice:
        click.echo(report.notice, err=True)


def main() -> None:
    """The console entry point: the offline guard and the SIGTERM handler belong to the `appliance`
    process, not to whoever imports the package or calls `cli` in-process (tests, notebooks)."""
    offline.install()
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="appliance")


if __name__ == "__main__":
    main()
