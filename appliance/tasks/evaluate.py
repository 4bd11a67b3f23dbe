"""Evaluate a student GGUF on a task run's held-out split, with the teacher's prompt and constraints.

Every prediction is a generation of the eval's own run (kind "eval"), and a `predictions` row ties it
to the example it answers; the per-task metrics go in `evals.metrics_json`. `appliance evals` lines
up results across students and datasets (e.g. before and after fine-tuning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..engine.types import SamplingParams
from ..errors import ApplianceError, with_article
from ..data.metrics import classification_report, extraction_report, transform_report
from ..models.registry import Registry
from ..events import RunEvents
from ..runs.style import style_for
from ..runs.items import Item, item_seeds
from ..runs.session import RunSession
from ..store import Store, command_prefix, insert_row, utcnow
from .prompts import parse_output, stop_strings
from .run import OUTPUT_MAX_TOKENS, task_item
from .spec import parse_task_spec


@dataclass
class EvalResult:
    eval_id: int
    run_id: int
    n: int
    reports: dict[str, dict[str, Any]]  # task -> metrics
    kinds: dict[str, str]


def evaluate(
    store: Store,
    registry: Registry,
    student: str,
    dataset_run: int,
    split: str = "test",
    *,
    n_parallel: int | None = None,
    mode: str = "auto",
    chat_template: str | None = None,
    events: RunEvents | None = None,
) -> EvalResult:
    run = store.rows("SELECT * FROM runs WHERE id = ?", [dataset_run])
    if not run:
        raise ApplianceError(f"no run {dataset_run} (see `{command_prefix(store.path)} runs`)")
    run = run[0]
    if run["kind"] != "task":
        raise ApplianceError(f"run {dataset_run} is {with_article(run['kind'])} run; eval needs a task run (made from a task spec)")
    examples = store.rows(
        "SELECT id, task, instruction, output, label FROM examples WHERE run_id = ? AND kept = 1 AND split = ? ORDER BY id",
        [dataset_run, split],
    )
    if not examples:
        splits = [r["split"] for r in store.rows("SELECT DISTINCT split FROM examples WHERE run_id = ? AND kept = 1 AND split IS NOT NULL", [dataset_run])]
        have = f"it has {', '.join(sorted(splits))}" if splits else "it has no kept examples"
        raise ApplianceError(f"run {dataset_run} has no {split!r} split ({have})")
    config = json.loads(run["config_json"])
    spec = parse_task_spec(config["spec"], f"run {dataset_run}")
    record = registry.resolve(student)
    # The student is asked through its own chat template when it has one (it may differ from the teacher's).
    style = style_for(record, mode=mode, chat_template=chat_template, fewshot=False)

    items = []
    for i, (ex, seed) in enumerate(zip(examples, item_seeds(0, len(examples)))):
        task = spec.task(ex["task"])
        params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_MAX_TOKENS[task.kind], stop=stop_strings(task))
        items.append(task_item(task, ex["instruction"], style, index=i, seed=seed, params=params,
                               variables={"example_id": ex["id"], "task": task.name}))
    with RunSession(store, record, events=events, n_parallel=n_parallel) as session:
        session.prepare(_by_task(items))
        run_id = session.begin(
            kind="eval", name=f"eval of {record.name} on run {dataset_run}/{split}", model_id=record.id,
            model_sha256=registry.ensure_sha256(record), requested=len(items),
            params={it.variables["task"]: it.params.model_dump() for it in items},
            config={"dataset_run": dataset_run, "split": split, "student": record.name}, **style.run_fields(),
        )
        session.generate(items, items[0].params)
        eval_id, reports, kinds = _score(store, spec, run_id, dataset_run, split, record.id, examples)
        session.complete()
    return EvalResult(eval_id, run_id, len(examples), reports, kinds)


def _by_task(items: list[Item]) -> list[tuple[list[str], SamplingParams]]:
    """Each task's prompts with its own settings: the workloads the eval's one plan must fit."""
    tasks: dict[str, list[Item]] = {}
    for it in items:
        tasks.setdefault(it.variables["task"], []).append(it)
    return [([it.prompt for it in group], group[0].params) for group in tasks.values()]


def _score(store: Store, spec: Any, run_id: int, dataset_run: int, split: str, student_id: int,
           examples: list[dict[str, Any]]) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """Compare the eval run's outputs with the examples; store the metrics and one prediction per example."""
    gens = {g["item_index"]: g for g in store.rows("SELECT id, item_index, output FROM generations WHERE run_id = ?", [run_id])}

    per_task: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for i, ex in enumerate(examples):
        per_task.setdefault(ex["task"], []).append((ex, gens[i]))
    reports, kinds, rows = {}, {}, []
    for name, pairs in per_task.items():
        task = spec.task(name)
        kinds[name] = task.kind
        predicted = [(ex, g, parse_output(task, g["output"])) for ex, g in pairs]
        if task.kind == "classify":
            reports[name] = classification_report([(ex["output"], p) for ex, _, p in predicted], task.label_names)
        elif task.kind == "extract":
            reports[name] = extraction_report([(json.loads(ex["output"]), g["output"]) for ex, g, _ in predicted], task.json_schema)
        else:
            reports[name] = transform_report([(ex["output"], g["output"].strip()) for ex, g, _ in predicted])
        for ex, g, p in predicted:
            rows.append({"example_id": ex["id"], "generation_id": g["id"], "task": name, "expected": ex["output"],
                         "predicted": g["output"].strip(), "correct": int(p is not None and _same(task.kind, p, ex["output"])),
                         "valid": int(p is not None)})
    with store.transaction() as conn:
        eval_id = insert_row(conn, "evals", {
            "run_id": run_id, "dataset_run_id": dataset_run, "student_model_id": student_id, "split": split,
            "n": len(examples), "metrics_json": json.dumps(reports, sort_keys=True), "created_at": utcnow()})
        for row in rows:
            insert_row(conn, "predictions", {"eval_id": eval_id, **row})
    return eval_id, reports, kinds


def _same(kind: str, predicted: str, expected: str) -> bool:
    if kind == "extract":
        return json.loads(predicted) == json.loads(expected)
    return predicted.strip() == expected.strip()


def list_evals(store: Store) -> list[dict[str, Any]]:
    rows = store.rows(
        "SELECT e.id, e.run_id, e.dataset_run_id, r.name AS dataset, m.name AS student, e.split, e.n, e.metrics_json, e.created_at "
        "FROM evals e JOIN models m ON m.id = e.student_model_id JOIN runs r ON r.id = e.dataset_run_id ORDER BY e.id"
    )
    for row in rows:
        row["metrics"] = json.loads(row.pop("metrics_json") or "{}")
    return rows


def headline(metrics: dict[str, Any]) -> str:
    """The one number per task that `evals` lines up: accuracy / macro F1, JSON validity / exact match."""
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.2f} F1 {metrics.get('macro_f1', 0):.2f}"
    if "json_valid" in metrics:
        return f"valid {metrics['json_valid']:.2f} exact {metrics.get('exact_match', 0):.2f}"
    return f"exact {metrics.get('exact_match', 0):.2f} F1 {metrics.get('token_f1', 0):.2f}"
