"""Commands that make or use a run's data: `generate`, `run` (recipes and task specs), `export`, `eval` and `evals`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import ApplianceError
from . import hint, open_registry, open_store, prefix


# ------------------------------------------------------------------------------------- generate
@click.command("generate")
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
    from ..runs.generate import GenerateOptions, generate
    from ..prompts.schema import load_json_schema
    from ..views.progress import GenerationProgress, json_row, text_row
    from ..prompts.files import load_prompt, parse_var

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
    store = open_store(ctx)
    registry = open_registry(store)
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
@click.command("run")
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--resume", "resume", type=int, metavar="RUN_ID", help="Continue this run (refused if its recipe or prompt changed).")
@click.option("--new-run", is_flag=True, help="Start a new run even if an unfinished one of this recipe exists.")
@click.option("--parallel", "n_parallel", type=click.IntRange(min=1), help="Sequences decoded together (default: the plan's).")
@click.option("-v", "--verbose", is_flag=True, help="Print every output as it completes (default: a progress bar and the summary; outputs are in `logs`, `report` and `browse`).")
@click.option("--quiet", is_flag=True, hidden=True, help="The default now: outputs are not printed (kept for old scripts).")
@click.option("--mode", type=click.Choice(["auto", "chat", "completion"]), help="Prompt through the model's chat template (chat) or as plain text (completion); default: the recipe's, else auto.")
@click.option("--chat-template", "chat_template", metavar="NAME|FILE", help="Chat template for GGUFs without one (or with a broken one): chatml, llama3, mistral, gemma, ... or a Jinja2 file.")
@click.option("--ray", "ray", metavar="ADDRESS", help="Generate on a Ray cluster: local (start one on this machine), auto, HOST:PORT or ray://HOST:PORT (join one). Needs appliance[ray].")
@click.option("--ray-actors", "ray_actors", type=click.IntRange(min=1), help="With --ray: this many actors spread over the nodes (default: one per node, one per GPU on GPU nodes).")
@click.pass_context
def run_cmd(ctx: click.Context, recipe_file: Path, resume: int | None, new_run: bool, n_parallel: int | None, verbose: bool, quiet: bool,
            mode, chat_template, ray, ray_actors) -> None:
    """Make a dataset from RECIPE_FILE: a recipe (synthetic, annotated, augmented, conversation, preference; `magpie = true`) or a task spec
    (`[[tasks]]`: data for small models). Re-running the file continues its unfinished run."""
    from ..launch import run_file
    from ..views.progress import GenerationProgress, text_row

    if resume is not None and new_run:
        raise ApplianceError("--resume and --new-run exclude each other")
    if ray_actors is not None and ray is None:
        raise ApplianceError("--ray-actors needs --ray ADDRESS")
    store = open_store(ctx)
    with GenerationProgress(show=text_row if verbose and not quiet else None) as progress:
        summary = run_file(store, open_registry(store), recipe_file, ray=ray, ray_actors=ray_actors, resume=resume, new_run=new_run,
                           n_parallel=n_parallel, mode=mode, chat_template=chat_template, events=progress)
    _print_summary(summary, hint(ctx, summary.run_id))
    if summary.kept == 0:
        raise ApplianceError(f"run {summary.run_id} {summary.why_nothing() or 'kept nothing'}")


def _print_summary(s, see: str) -> None:
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
    if s.judge:
        click.echo(f"  {s.judge.line()}", err=True)
    if s.echo:
        r, o = s.echo["length_ratio"], s.echo["ngram_overlap"]
        click.echo(
            f"  echo: instruction/output length ratio median {r['median']:.2f} (p90 {r['p90']:.2f}, max {r['max']:.2f}); "
            f"3-gram overlap median {o['median']:.0%} (p90 {o['p90']:.0%}, max {o['max']:.0%})",
            err=True,
        )
    for line in s.advice:
        click.echo(f"  fix: {line}", err=True)
    for path, reason in s.skipped_sources:
        click.echo(f"  skipped source {path}: {reason}", err=True)
    for line in s.table_lines:
        click.echo(f"  {line}", err=True)
    click.echo(f"  {see}", err=True)


@click.command("export")
@click.argument("run_ref", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["openai", "sharegpt", "alpaca", "jsonl", "dpo", "openai-preference"]), default="openai", show_default=True,
              help="dpo (TRL) and openai-preference: a preference run's pairs.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output file (with --split: NAME.SPLIT.jsonl beside it).")
@click.option("--split", "split", metavar="NAME=RATIO,...", help="e.g. train=0.9,test=0.1: deterministic, no near-duplicates across splits.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--resplit", is_flag=True, help="Split a run that stored its splits (a task run) again; the card records it.")
@click.option("--force", is_flag=True, help="Replace files an earlier export wrote (refused without it).")
@click.pass_context
def export_cmd(ctx: click.Context, run_ref: str, fmt: str, out: Path, split: str | None, seed: int, resplit: bool, force: bool) -> None:
    """Write the examples of RUN (an id, `last`, or a run name) that passed every filter, and a dataset card beside
    them. A task run's stored splits are kept (one file per split), so no example `eval` tests on is trained on."""
    from ..export import export_run
    from ..runs.queries import resolve_run

    store = open_store(ctx, readonly=True)
    result = export_run(store, resolve_run(store, run_ref), fmt, out, split, seed, resplit=resplit, force=force)
    for name, (path, n) in result.files.items():
        click.echo(f"{name}: {n} examples -> {path}")
    click.echo(f"card: {result.card}")


@click.command("eval")
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
    from ..tasks.evaluate import evaluate
    from ..runs.queries import resolve_run
    from ..data.metrics import format_report
    from ..views.progress import GenerationProgress

    store = open_store(ctx)
    dataset_run = resolve_run(store, dataset_ref)
    with GenerationProgress(describe="evaluating") as progress:
        result = evaluate(store, open_registry(store), student, dataset_run, split, n_parallel=n_parallel, mode=mode,
                          chat_template=chat_template, events=progress)
    if as_json:
        click.echo(json.dumps({"eval_id": result.eval_id, "run_id": result.run_id, "n": result.n, "tasks": result.reports}, indent=2))
        return
    click.echo(f"eval {result.eval_id} (run {result.run_id}): {result.n} examples of run {dataset_run}/{split}")
    for name, report in result.reports.items():
        click.echo(f"\n## {name} ({result.kinds[name]}, {report['count']} examples)")
        click.echo(format_report(report, result.kinds[name]))


@click.command("evals")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@click.pass_context
def evals_cmd(ctx: click.Context, as_json: bool) -> None:
    """Compare evaluation results across students and datasets."""
    from ..tasks.evaluate import headline, list_evals

    rows = list_evals(open_store(ctx, readonly=True))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no evaluations yet: `{prefix(ctx)} eval STUDENT --dataset RUN_ID`", err=True)
        return
    for row in rows:
        scores = "  ".join(f"{task} (n={m.get('count', '?')}): {headline(m)}" for task, m in sorted(row["metrics"].items()))
        click.echo(f"eval {row['id']:>3}  {row['student']:<24} on run {row['dataset_run_id']} ({row['dataset']}/{row['split']}, "
                   f"{row['n']} examples)  {scores}")


COMMANDS = (generate_cmd, run_cmd, export_cmd, eval_cmd, evals_cmd)
