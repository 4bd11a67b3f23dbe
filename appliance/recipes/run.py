"""Dataset recipes: build a run's items, generate them (resumable), filter, and keep examples with lineage.

Three kinds sit on a spectrum from model-reliant to source-reliant (docs/ARCHITECTURE.md):
- synthetic: the prompt is rendered over combinations of the recipe's axes; each output is an example
  (instruction = the recipe's `instruction` template over the axes, output = the model's text);
- annotated: sources are cut into chunks; the model writes the instruction that could have produced
  each chunk; the example is instruction -> the ORIGINAL chunk, guarded against echoing instructions;
- augmented: each chunk is worked into a prompt that yields a grounded question and answer; the
  example is question (+ the chunk as input) -> answer, checked for grounding in its chunk.

Filters run over all of a run's generations after generation, in item order, and replace the run's
verdicts and examples in one transaction, so a resumed run ends with the same result as an
uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2.sandbox

from ..engine.llama import Vocab
from ..errors import ApplianceError, ResumeError, with_article
from ..runs.generate import sampling_for
from ..models.registry import Registry
from . import fidelity
from ..prompts.files import PromptFile, check_used, load_prompt
from ..data.filters import (EchoGuard, NearDuplicateIndex, Verdict, check_grounded, check_json, check_length, check_not_empty, check_truncated,
                      cue_verdict, echo_metrics, summarize_echo)
from .recipe import LoadedRecipe, Recipe
from ..events import RunEvents
from ..runs.style import PromptStyle, style_for
from .retry import ITEM_LIMIT, attempt_of, attempts, cleaned, run_retries
from ..runs.items import Execution, Item, item_seeds, merge, pending
from ..runs.session import RunSession
from ..prompts.schema import load_json_schema
from .sources import chunk_text, read_sources
from ..store.database import Store, insert_row, utcnow

PASSAGE_VAR = "passage"
RECIPE_KINDS = ("synthetic", "annotated", "augmented")


# --------------------------------------------------------------------------------------------- items


def _axis_combinations(axes: dict[str, list[Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` assignments of the axes: every combination once (shuffled by the seed) before any repeats."""
    if not axes:
        return [{} for _ in range(count)]
    names = sorted(axes)
    combos = [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < count:
        batch = combos[:]
        rng.shuffle(batch)
        out.extend(batch)
    return out[:count]


def ingest_chunks(store: Store, loaded: LoadedRecipe, vocab: Vocab) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Read the recipe's sources into the store and cut them into chunks (real model tokens).
    Returns the chunk rows in source order and the files skipped with their reasons."""
    recipe = loaded.recipe
    docs, skipped = read_sources([loaded.resolve(s) for s in recipe.sources], jsonl_field=recipe.jsonl_field)
    chunks: list[dict[str, Any]] = []
    for doc in docs:
        with store.transaction() as conn:
            row = conn.execute(
                "SELECT id FROM sources WHERE path = ? AND record IS ? AND sha256 = ?", [doc.path, doc.record, doc.sha256]
            ).fetchone()
            source_id = row[0] if row else insert_row(conn, "sources", {
                "path": doc.path, "record": doc.record, "title": doc.title, "sha256": doc.sha256,
                "n_chars": doc.n_chars, "text": doc.text, "created_at": utcnow(),
            })
            existing = conn.execute(
                'SELECT id, chunk_index, text, start, "end", n_tokens FROM chunks WHERE source_id = ? AND max_tokens = ? ORDER BY chunk_index',
                [source_id, recipe.chunking.max_tokens],
            ).fetchall()
            if existing:
                chunks += [dict(zip(("id", "chunk_index", "text", "start", "end", "n_tokens"), r), source_id=source_id) for r in existing]
                continue
            for c in chunk_text(doc.text, recipe.chunking.max_tokens, recipe.chunking.min_tokens, vocab.count):
                row = {"source_id": source_id, "chunk_index": c.index, "max_tokens": recipe.chunking.max_tokens,
                       "start": c.start, "end": c.end, "n_tokens": c.n_tokens, "text": c.text}
                chunks.append({**row, "id": insert_row(conn, "chunks", row)})
    return chunks, skipped


def build_items(loaded: LoadedRecipe, prompt: PromptFile, chunks: list[dict[str, Any]], style: PromptStyle) -> list[Item]:
    """The run's items, fully determined by the recipe (and its sources): the same recipe gives the same
    items, which is what lets a run resume."""
    recipe = loaded.recipe
    if recipe.kind == "synthetic":
        assignments = _axis_combinations(recipe.axes, recipe.count or 0, recipe.seed)
        chunk_ids: list[int | None] = [None] * len(assignments)
    else:
        chosen = chunks[: recipe.count] if recipe.count else chunks
        assignments = [{PASSAGE_VAR: c["text"]} for c in chosen]
        chunk_ids = [c["id"] for c in chosen]
    items = []
    for index, (values, seed, chunk_id) in enumerate(zip(assignments, item_seeds(recipe.seed, len(assignments)), chunk_ids)):
        variables = {**prompt.values_for_item(recipe.vars, seed), **values}
        items.append(style.item(prompt, variables, index=index, seed=seed, chunk_id=chunk_id))
    return items


# ------------------------------------------------------------------------------------------- filters


@dataclass
class Candidate:
    generation_id: int
    item_index: int
    instruction: str
    input: str
    output: str
    chunk_id: int | None
    verdicts: list[Verdict] = field(default_factory=list)
    echo: dict[str, Any] | None = None
    replaced: bool = False  # an empty attempt generated again: its verdicts are kept, it makes no example

    @property
    def kept(self) -> bool:
        return all(v.passed for v in self.verdicts)


_QA = re.compile(r"^\s*(?P<q>.+?)\s*\n+\s*Answer:\s*(?P<a>.+?)\s*$", re.S)


def parse_qa(text: str) -> tuple[str, str] | None:
    """Question and answer from an augmented output: JSON {"question", "answer"} or text "...\\nAnswer: ..."."""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("question"), str) and isinstance(data.get("answer"), str):
            return data["question"].strip(), data["answer"].strip()
    except json.JSONDecodeError:
        pass
    m = _QA.match(text)
    return (m["q"].removeprefix("Question:").strip(), m["a"].strip()) if m else None


def judge(recipe: Recipe, gens: list[dict[str, Any]], chunks: dict[int, str], schema: dict | None) -> list[Candidate]:
    """Every filter's verdict for the final attempt of every item, in item order (an empty attempt that was
    generated again gets a `not_empty` verdict naming its replacement, and no example)."""
    f = recipe.filters
    guard = EchoGuard(max_length_ratio=f.echo_max_length_ratio, max_ngram_overlap=f.echo_max_ngram_overlap, max_shared_run=f.echo_max_shared_run)
    dedup = NearDuplicateIndex(threshold=f.near_duplicate_threshold) if f.near_duplicate_threshold else None
    instruction_template = _ENV.from_string(recipe.instruction) if recipe.instruction else None
    finals, superseded = attempts(gens)
    labelled = fidelity.labels(gens)
    replaced_by_item: dict[int, list[dict[str, Any]]] = {}
    for g in gens:
        if g["id"] in superseded:
            replaced_by_item.setdefault(attempt_of(g["item_index"])[0], []).append(g)
    out: list[Candidate] = []
    for g in finals:
        item = attempt_of(g["item_index"])[0]
        for old in replaced_by_item.get(item, []):
            cand = Candidate(old["id"], item, "", "", "", old["chunk_id"], replaced=True)
            cand.verdicts.append(Verdict(filter="not_empty", passed=False,
                                         reason=f"output is empty; generated again with a new seed as item {superseded[old['id']]}"))
            out.append(cand)
        text, cue, n_cue = cleaned(g["output"], g["rendered_prompt"])
        chunk = chunks.get(g["chunk_id"]) if g["chunk_id"] else None
        variables = json.loads(g["variables_json"] or "{}")
        if recipe.kind == "synthetic":
            instruction = instruction_template.render(**variables) if instruction_template else _describe(variables)
            cand = Candidate(g["id"], item, instruction, "", text, None)
            checked = text
        elif recipe.kind == "annotated":
            cand = Candidate(g["id"], item, text, "", (chunk or "").strip(), g["chunk_id"])
            checked = text
        else:
            qa = parse_qa(text)
            question, answer = qa if qa else ("", "")
            cand = Candidate(g["id"], item, question, (chunk or "").strip(), answer, g["chunk_id"])
            checked = answer
            cand.verdicts.append(Verdict(filter="parse", passed=qa is not None,
                                         reason="question and answer found" if qa else "no 'Answer:' after the question"))
        if n_cue:
            cand.verdicts.insert(0, cue_verdict(cue or "", n_cue))
        cand.verdicts.append(check_not_empty(text))
        cand.verdicts.append(check_truncated(g["finish_reason"], allow_truncated=f.allow_truncated))
        if f.min_words is not None or f.max_words is not None:
            cand.verdicts.append(check_length(checked, min_words=f.min_words, max_words=f.max_words))
        if schema is not None:
            cand.verdicts.append(check_json(text, schema))
        if g["id"] in labelled:
            cand.verdicts.append(fidelity.verdict(labelled[g["id"]]))
        if recipe.kind == "annotated" and text:
            metrics = echo_metrics(cand.instruction, cand.output)
            cand.echo = metrics.model_dump()
            cand.verdicts.append(guard.judge(metrics))
        if recipe.kind == "augmented" and answer:
            cand.verdicts.append(check_grounded(answer, chunk or "", min_score=f.grounding_min_score))
        if dedup is not None and cand.kept:
            cand.verdicts.append(dedup.check(str(item + 1), f"{cand.instruction}\n{cand.output}"))
        out.append(cand)
    return out


_ENV = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def _describe(variables: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in sorted(variables.items()))


def store_judgement(store: Store, run_id: int, recipe: Recipe, candidates: list[Candidate]) -> None:
    """Replace the run's verdicts and examples in one transaction."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM verdicts WHERE run_id = ?", [run_id])
        conn.execute("DELETE FROM examples WHERE run_id = ?", [run_id])
        for c in candidates:
            for v in c.verdicts:
                insert_row(conn, "verdicts", {"run_id": run_id, "generation_id": c.generation_id, "filter": v.filter,
                                              "passed": int(v.passed), "score": v.score, "reason": v.reason})
            if c.replaced:
                continue
            insert_row(conn, "examples", {
                "run_id": run_id, "generation_id": c.generation_id, "chunk_id": c.chunk_id,
                "instruction": c.instruction, "input": c.input, "output": c.output, "system": recipe.system,
                "label": None, "group_key": f"chunk:{c.chunk_id}" if c.chunk_id else f"item:{c.item_index}",
                "kept": int(c.kept), "created_at": utcnow(),
            })


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunSummary:
    run_id: int
    kind: str
    status: str
    requested: int
    generated: int
    kept: int
    dropped: dict[str, int]
    first_reasons: dict[str, str]
    echo: dict[str, Any] | None
    skipped_sources: list[tuple[str, str]]
    execution: Execution | None = None
    resumed: bool = False  # an unfinished run was continued
    already_complete: bool = False  # the run found was complete: nothing was generated or resumed
    table_lines: list[str] = field(default_factory=list)  # per task/label counts of task runs
    model_loads: int = 0  # model loads this session (1 for a run that generated anything)
    retried: int = 0  # empty outputs generated again with a new seed
    fidelity: dict[str, tuple[int, int]] = field(default_factory=dict)  # axis -> (labelled as asked, checked)

    def why_nothing(self) -> str:
        if self.kept or not self.generated:
            return ""
        if not self.dropped:
            return "kept nothing: no example has been judged yet (run it again to finish it)"
        parts = [f"{n} by {name} (e.g. {self.first_reasons[name]})" for name, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        return "kept nothing: dropped " + "; ".join(parts)


def summarize(store: Store, run_id: int) -> RunSummary:
    run = store.rows("SELECT * FROM runs WHERE id = ?", [run_id])
    if not run:
        raise ApplianceError(f"no run {run_id} (see `appliance runs`)")
    run = run[0]
    recipe_run = run["kind"] in RECIPE_KINDS
    generated = store.rows("SELECT count(*) n FROM generations WHERE run_id = ?" + (" AND item_index < ?" if recipe_run else ""),
                           [run_id] + ([ITEM_LIMIT] if recipe_run else []))[0]["n"]  # the items, not their retries or checks
    retried = store.rows("SELECT count(*) n FROM generations WHERE run_id = ? AND item_index >= ? AND item_index < ?",
                         [run_id, ITEM_LIMIT, fidelity.FIDELITY_BASE])[0]["n"] if recipe_run else 0
    kept = store.rows("SELECT count(*) n FROM examples WHERE run_id = ? AND kept = 1", [run_id])[0]["n"]
    dropped, reasons = first_failures(store, run_id)
    echo = None
    if run["kind"] == "annotated":
        rows = store.rows("SELECT instruction, output FROM examples WHERE run_id = ? AND instruction != ''", [run_id])
        echo = summarize_echo([echo_metrics(r["instruction"], r["output"]) for r in rows]) if rows else None
    skipped = [tuple(m["message"].split(": ", 1)) for m in store.rows(
        "SELECT message FROM run_events WHERE run_id = ? AND message LIKE 'skipped source %'", [run_id])]
    return RunSummary(run_id, run["kind"], run["status"], run["requested"], generated, kept, dropped, reasons, echo,
                      [(p.removeprefix("skipped source "), r) for p, r in skipped], retried=retried,
                      fidelity=fidelity.rates(store, run_id) if recipe_run else {})


def first_failures(store: Store, run_id: int) -> tuple[dict[str, int], dict[str, str]]:
    """Dropped examples per filter, each counted once under the first filter it failed, with an example
    reason; attempts generated again (no example of their own) are not drops."""
    rows = store.rows(
        """SELECT v.filter, count(*) n, min(v.reason) reason FROM verdicts v JOIN (
               SELECT min(v2.id) id FROM examples e JOIN verdicts v2 ON v2.generation_id = e.generation_id AND v2.passed = 0
               WHERE e.run_id = ? AND e.kept = 0 GROUP BY e.id) first ON first.id = v.id
           GROUP BY v.filter""", [run_id])
    return {r["filter"]: r["n"] for r in rows}, {r["filter"]: r["reason"] for r in rows}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def find_resumable(
    store: Store, *, name: str, kinds: tuple[str, ...], sha256: str, config: tuple[str, dict[str, Any]],
    what: str, resume: int | None, new_run: bool,
) -> dict[str, Any] | None:
    """The run to continue: `resume`, else the newest run of this name and kind (None: start a new run).
    Refuses a run of another kind, or one made from a different file, naming the keys that changed."""
    if new_run:
        return None
    if resume is not None:
        rows = store.rows("SELECT * FROM runs WHERE id = ?", [resume])
        if not rows:
            raise ResumeError(f"no run {resume} to resume (see `appliance runs`)")
    else:
        marks = ", ".join("?" * len(kinds))
        rows = store.rows(f"SELECT * FROM runs WHERE name = ? AND kind IN ({marks}) ORDER BY id DESC LIMIT 1", [name, *kinds])
        if not rows:
            return None
    run = rows[0]
    if run["kind"] not in kinds:
        raise ResumeError(f"run {run['id']} is {with_article(run['kind'])} run, not {with_article(what)} run")
    if run["recipe_sha256"] != sha256:
        key, new = config
        changed = _changes(json.loads(run["config_json"] or "{}").get(key, {}), new)
        because = ", ".join(changed) if changed else "its text (comments or layout)"
        raise ResumeError(f"{what} changed since run {run['id']} ({because}); use --new-run to start over")
    return run


def find_run(store: Store, loaded: LoadedRecipe, prompt: PromptFile, resume: int | None, new_run: bool,
             style: PromptStyle | None = None) -> tuple[int | None, bool]:
    """(run id to continue or None for a new run, whether it is already complete). Refuses to continue a
    run whose recipe or prompt changed, saying what changed."""
    run = find_resumable(
        store, name=_run_name(loaded), kinds=(loaded.recipe.kind,) if resume is None else RECIPE_KINDS,
        sha256=loaded.sha256, config=("recipe", loaded.recipe.model_dump(by_alias=True)), what="recipe",
        resume=resume, new_run=new_run,
    )
    if run is None:
        return None, False
    prompt_row = store.rows("SELECT sha256 FROM prompts WHERE id = ?", [run["prompt_id"]])
    if prompt_row and prompt_row[0]["sha256"] != prompt.sha256:
        raise ResumeError(f"prompt {prompt.path} changed since run {run['id']}; use --new-run to start over")
    if style is not None:
        style.check_resume(run)
    return run["id"], run["status"] == "completed"


def _run_name(loaded: LoadedRecipe) -> str:
    return loaded.recipe.name or Path(loaded.path).stem


def _finals(store: Store, run_id: int) -> list[tuple[int, int, str, dict[str, Any]]]:
    """(item, generation id, cleaned text, variables) of each item's final attempt that has text: what the
    fidelity checks label."""
    gens = store.rows("SELECT id, item_index, output, rendered_prompt, variables_json FROM generations WHERE run_id = ? AND item_index < ?",
                      [run_id, fidelity.FIDELITY_BASE])
    out = []
    for g in attempts(gens)[0]:
        text = cleaned(g["output"], g["rendered_prompt"])[0]
        if text:
            out.append((attempt_of(g["item_index"])[0], g["id"], text, json.loads(g["variables_json"] or "{}")))
    return out


def run_file(store: Store, registry: Registry, file: str | Path, *, ray: str | None = None, ray_actors: int | None = None,
             **options: Any) -> RunSummary:
    """`appliance run FILE`: a recipe or a task spec, in this process or (`ray`: local, auto, HOST:PORT or
    ray://HOST:PORT) on a Ray cluster's actors; `options` are run_recipe's / run_task_spec's."""
    from .recipe import is_task_spec, load_recipe

    if is_task_spec(file):
        from ..tasks.spec import load_task_spec
        from ..tasks.run import run_task_spec

        loaded: Any = load_task_spec(file)
        runner: Any = run_task_spec
    else:
        loaded, runner = load_recipe(file), run_recipe
    if ray is None:
        return runner(store, registry, loaded, **options)
    from ..workers.cluster import Cluster

    with Cluster(ray, actors=ray_actors) as cluster:
        return runner(store, registry, loaded, cluster=cluster, **options)


def run_recipe(
    store: Store,
    registry: Registry,
    loaded: LoadedRecipe,
    *,
    resume: int | None = None,
    new_run: bool = False,
    n_parallel: int | None = None,
    mode: str | None = None,
    chat_template: str | None = None,
    events: RunEvents | None = None,
    cluster: Any = None,
) -> RunSummary:
    events = events or RunEvents()
    recipe = loaded.recipe
    prompt = load_prompt(loaded.resolve(recipe.prompt))
    if recipe.kind != "synthetic" and PASSAGE_VAR not in prompt.variables:
        raise ApplianceError(f"prompt {prompt.path} must use {{{{ {PASSAGE_VAR} }}}} for an {recipe.kind} recipe "
                             f"(its variables: {', '.join(prompt.variables) or 'none'})")
    check_used(prompt, recipe.axes, f"recipe {loaded.path}: axis")
    check_used(prompt, recipe.vars, f"recipe {loaded.path}: [vars]")
    checks = fidelity.load_checks(loaded)
    given = set(recipe.vars) | set(recipe.axes) | set(prompt.header.vars) | ({PASSAGE_VAR} if recipe.kind != "synthetic" else set())
    missing = [v for v in prompt.variables if v not in given]
    if missing:
        raise ApplianceError(f"prompt {prompt.path} uses {', '.join(repr(m) for m in missing)}, which recipe {loaded.path} does not give (add to [vars] or [axes])")
    schema = load_json_schema(loaded.resolve(recipe.schema_file)) if recipe.schema_file else None
    params = sampling_for(prompt, recipe.sampling.model_dump(exclude={"stop"}) | ({"stop": recipe.sampling.stop} if recipe.sampling.stop is not None else {}))
    record = registry.resolve(recipe.model)
    if cluster is not None:
        registry.ensure_sha256(record)  # the nodes' copies are checked against it
    style = style_for(record, prompt=prompt, mode=mode or recipe.mode, chat_template=chat_template or recipe.chat_template,
                      system=recipe.system)
    run_id, complete = find_run(store, loaded, prompt, resume, new_run, style)

    chunks: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    if recipe.kind != "synthetic":
        with Vocab(record.path) as vocab:
            chunks, skipped = ingest_chunks(store, loaded, vocab)
        for path, reason in skipped:
            events.warning(f"skipped source {path}: {reason}")
        if not chunks:
            raise ApplianceError(f"the sources of {loaded.path} gave no chunks of text")
    items = build_items(loaded, prompt, chunks, style)
    if len(items) >= ITEM_LIMIT:
        raise ApplianceError(f"recipe {loaded.path} makes {len(items)} items; at most {ITEM_LIMIT - 1} fit one run")

    execution = None
    resumed = run_id is not None
    if not complete:
        with RunSession(store, record, events=events, n_parallel=n_parallel or recipe.parallel, cluster=cluster) as session:
            todo = pending(store, run_id, items)
            session.prepare([([it.prompt for it in todo or items], params)])
            prompt_id = store.save_prompt(prompt.name, prompt.text, prompt.sha256, prompt.path)
            if run_id is None:
                run_id = session.begin(
                    kind=recipe.kind, name=_run_name(loaded), recipe_sha256=loaded.sha256, model_id=record.id,
                    model_sha256=registry.ensure_sha256(record), prompt_id=prompt_id, requested=len(items),
                    variables=recipe.vars, params={**params.model_dump(), "seed": recipe.seed},
                    schema=schema[0] if schema else None,
                    config={"recipe_path": loaded.path, "recipe": recipe.model_dump(by_alias=True)}, **style.run_fields(),
                )
                for path, reason in skipped:
                    store.event(run_id, "warning", f"skipped source {path}: {reason}")
            else:
                session.attach(run_id)
            grammar = schema[1] if schema else None
            execution = session.generate(items, params, prompt_id=prompt_id, grammar=grammar)
            retries = run_retries(session, prompt_id, items, params, recipe.seed, grammar=grammar)
            checked = fidelity.run_checks(session, checks, _finals(store, run_id), recipe.seed) if checks else None
            for message in fidelity.uninformative(store, run_id) if checked else []:
                session.event("warning", message)
            execution = merge([execution, *retries, *([checked] if checked else [])])
            _judge_run(store, run_id, recipe, chunks, schema)
            session.complete()
            loads = session.loads
    else:
        _judge_run(store, run_id, recipe, chunks, schema)
        loads = 0
    summary = summarize(store, run_id)
    summary.execution, summary.model_loads = execution, loads
    summary.resumed, summary.already_complete = resumed and not complete, complete
    return summary


def _judge_run(store: Store, run_id: int, recipe: Recipe, chunks: list[dict[str, Any]], schema: tuple[dict, Any] | None) -> None:
    gens = store.rows("SELECT * FROM generations WHERE run_id = ? ORDER BY item_index", [run_id])
    chunk_text_by_id = {c["id"]: c["text"] for c in chunks}
    store_judgement(store, run_id, recipe, judge(recipe, gens, chunk_text_by_id, schema[0] if schema else None))
