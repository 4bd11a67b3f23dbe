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

import json
from pathlib import Path
from typing import Any

from ..engine.llama import Vocab
from ..errors import ApplianceError, ResumeError
from ..events import RunEvents
from ..prompts.files import PromptFile, check_used, load_prompt, sampling_for
from ..prompts.schema import load_json_schema
from ..engine.types import SamplingParams
from ..models.registry import ModelRecord, Registry
from ..runs.items import FIDELITY_BASE, ITEM_LIMIT, RECIPE_KINDS, Execution, Item, merge, pending
from ..runs.rubric import Rubric, judge_workload, load_rubric
from ..runs.queries import find_resumable
from ..runs.session import RunSession
from ..runs.style import PromptStyle, style_for
from ..runs.summary import RunSummary, summarize
from ..store import Store
from . import conversation, fidelity, preference
from .build import PASSAGE_VAR, build_items, ingest_chunks
from .judge import JUDGED_COLUMNS, judge, score_candidates, store_judgement
from .magpie import run_magpie
from .recipe import FROM_AXES, LoadedRecipe, Recipe
from .retry import attempt_of, attempts, cleaned, run_retries


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
                      [run_id, FIDELITY_BASE])
    out = []
    for g in attempts(gens)[0]:
        text = cleaned(g["output"], g["rendered_prompt"])[0]
        if text:
            out.append((attempt_of(g["item_index"])[0], g["id"], text, json.loads(g["variables_json"] or "{}")))
    return out


def _checked_inputs(loaded: LoadedRecipe, prompt: PromptFile) -> list[fidelity.Check]:
    """Refuse a prompt that does not fit the recipe (before anything is loaded); the recipe's fidelity checks."""
    recipe = loaded.recipe
    if recipe.kind not in FROM_AXES and PASSAGE_VAR not in prompt.variables:
        raise ApplianceError(f"prompt {prompt.path} must use {{{{ {PASSAGE_VAR} }}}} for an {recipe.kind} recipe "
                             f"(its variables: {', '.join(prompt.variables) or 'none'})")
    check_used(prompt, recipe.axes, f"recipe {loaded.path}: axis")
    check_used(prompt, recipe.vars, f"recipe {loaded.path}: [vars]")
    checks = fidelity.load_checks(loaded)
    given = set(recipe.vars) | set(recipe.axes) | set(prompt.header.vars) | ({PASSAGE_VAR} if recipe.kind not in FROM_AXES else set())
    missing = [v for v in prompt.variables if v not in given]
    if missing:
        raise ApplianceError(f"prompt {prompt.path} uses {', '.join(repr(m) for m in missing)}, which recipe {loaded.path} does not give (add to [vars] or [axes])")
    return checks


def _read_chunks(store: Store, registry: Registry, loaded: LoadedRecipe, record: ModelRecord,
                 events: RunEvents) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """A recipe's chunks (cut in the model's tokens, keyed by its file's sha256) and the sources it skipped;
    nothing for synthetic and preference recipes, or a conversation recipe without sources."""
    if loaded.recipe.kind in FROM_AXES or not loaded.recipe.sources:
        return [], []
    with Vocab(record.path) as vocab:
        chunks, skipped = ingest_chunks(store, loaded, vocab, registry.ensure_sha256(record))
    for path, reason in skipped:
        events.warning(f"skipped source {path}: {reason}")
    if not chunks:
        raise ApplianceError(f"the sources of {loaded.path} gave no chunks of text")
    return chunks, skipped


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
    if loaded.recipe.magpie:  # no prompt file: the model writes its own requests (recipes/magpie.py)
        return run_magpie(store, registry, loaded, resume=resume, new_run=new_run, n_parallel=n_parallel, mode=mode,
                          chat_template=chat_template, events=events, cluster=cluster, name=_run_name(loaded))
    events = events or RunEvents()
    recipe = loaded.recipe
    assert recipe.prompt is not None  # the recipe validator requires it for every recipe but a magpie one
    prompt = load_prompt(loaded.resolve(recipe.prompt))
    user_prompt = conversation.load_inputs(loaded, prompt) if recipe.kind == "conversation" else None
    checks = _checked_inputs(loaded, prompt) if user_prompt is None else []
    schema = load_json_schema(loaded.resolve(recipe.schema_file)) if recipe.schema_file else None
    params = sampling_for(prompt, recipe.sampling.model_dump(exclude={"stop"}) | ({"stop": recipe.sampling.stop} if recipe.sampling.stop is not None else {}))
    record = registry.resolve(recipe.model)
    if cluster is not None:
        registry.ensure_sha256(record)  # the nodes' copies are checked against it
    style = style_for(record, prompt=prompt, mode=mode or recipe.mode, chat_template=chat_template or recipe.chat_template,
                      system=recipe.system)
    run_id, complete = find_run(store, loaded, prompt, resume, new_run, style)
    if complete:  # nothing to generate and its verdicts stand (the same recipe and prompt): no items, no judging
        summary = summarize(store, run_id)
        summary.already_complete = True
        return summary

    chunks, skipped = _read_chunks(store, registry, loaded, record, events)
    rubric = load_rubric(recipe.judge, loaded.resolve, registry, record, where=f"recipe {loaded.path}",
                         chat_template=chat_template or recipe.chat_template) if recipe.judge else None
    if user_prompt is not None:  # its own rounds, turn by turn (`appliance.recipes.conversation`)
        return conversation.run_conversation(store, registry, loaded, (user_prompt, prompt), rubric, record=record, style=style, run_id=run_id,
                                             name=_run_name(loaded), chunks=chunks, skipped=skipped, events=events,
                                             n_parallel=n_parallel, cluster=cluster)
    items = build_items(loaded, prompt, chunks, style)
    if len(items) >= ITEM_LIMIT:
        raise ApplianceError(f"recipe {loaded.path} makes {len(items)} items; at most {ITEM_LIMIT - 1} fit one run")

    resumed = run_id is not None
    with RunSession(store, record, events=events, n_parallel=n_parallel or recipe.parallel, cluster=cluster) as session:
        work = preference.response_items(recipe, items, params) if recipe.kind == "preference" else items
        todo = pending(store, run_id, work)
        session.prepare([([it.prompt for it in todo or work], params), *judge_workload(rubric, record, len(items), params)])
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
        if recipe.kind == "preference":
            assert rubric is not None  # the recipe's validation requires a judge
            execution = preference.run_pairs(session, recipe, rubric, work, params, prompt_id=prompt_id, grammar=grammar,
                                             schema=schema[0] if schema else None)
        else:
            execution = _generate_and_check(session, checks, items, params, recipe.seed, prompt_id=prompt_id, grammar=grammar)
            execution = merge([execution, _judge_run(session, recipe, chunks, schema, rubric)])
        session.complete()
        loads = session.loads
    summary = summarize(store, run_id)
    summary.execution, summary.model_loads = execution, loads
    summary.resumed = resumed
    return summary


def _generate_and_check(session: RunSession, checks: list[fidelity.Check], items: list[Item], params: SamplingParams, seed: int, *,
                        prompt_id: int, grammar: Any) -> Execution | None:
    """The main stage (the items not stored yet), its retries of empty outputs, then the fidelity checks."""
    store, run_id = session.store, session.run_id
    execution = session.generate(items, params, prompt_id=prompt_id, grammar=grammar)
    retries = run_retries(session, prompt_id, items, params, seed, grammar=grammar)
    checked = fidelity.run_checks(session, checks, _finals(store, run_id), seed) if checks else None
    for message in fidelity.uninformative(store, run_id) if checked else []:
        session.event("warning", message)
    return merge([execution, *retries, checked])


def _judge_run(session: RunSession, recipe: Recipe, chunks: list[dict[str, Any]], schema: tuple[dict, Any] | None,
               rubric: Rubric | None) -> Execution | None:
    """The mechanical filters; then the judge scores the outputs that passed them (those not scored yet), and
    its verdicts join theirs; all stored in one transaction."""
    store, run_id = session.store, session.run_id
    gens = store.rows(f"SELECT {JUDGED_COLUMNS} FROM generations WHERE run_id = ? ORDER BY item_index", [run_id])
    chunk_text_by_id = {c["id"]: c["text"] for c in chunks}
    candidates = judge(recipe, gens, chunk_text_by_id, schema[0] if schema else None)
    scored = score_candidates(session, rubric, candidates, recipe.seed) if rubric is not None else None
    store_judgement(store, run_id, recipe, candidates)
    return scored
