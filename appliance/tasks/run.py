"""Task data for small models: a spec of two or three tasks -> varied inputs -> constrained, self-consistent
labels -> balanced, de-duplicated, stratified splits, all in one resumable run.

Rounds, each of two phases, all stored as generations of one run (kind "task"):
  A. the teacher writes inputs: per label (classify) or per task, along the task's axes, with edge
     cases and hard negatives mixed in; more are asked for the labels still short of their targets;
  B. the teacher answers each new input k times under the task's grammar (self-consistency): the
     majority answer is the label/output, the share of samples that agree is its confidence. An
     input whose majority label is not the label it was written for is dropped ("intent"), and so
     is one whose agreement is below the spec's minimum ("agreement"); labels over their target
     keep their most confident examples ("balance").
Item indices are derived from (round, phase, position), and every round's items follow from what
earlier rounds stored, so a resumed run regenerates exactly the missing items.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import SamplingParams
from ..errors import ApplianceError
from ..events import RunEvents
from ..data.examples import Example
from ..data.sketches import ExampleSketches
from ..data.splits import parse_split_spec, split_examples
from ..runs.queries import find_resumable
from ..runs.summary import RunSummary, summarize
from ..models.registry import Registry
from ..runs.style import PromptStyle, style_for
from ..data.filters import NearDuplicateIndex, Verdict
from ..runs.items import JUDGE_BASE, Item, item_seeds, merge
from ..runs.rubric import Judged, Rubric, judge_verdicts, load_rubric, run_judge
from ..runs.session import RunSession, Workload
from ..store import Store, insert_row, to_json, utcnow
from .prompts import (
    INPUT_STOP,
    copied_scaffold,
    output_constraint,
    parse_input,
    parse_output,
    render_input_prompt,
    render_task_prompt,
    stop_strings,
    task_messages,
)
from .kinds import ClassifyTask, Task
from .spec import LoadedTaskSpec, label_targets, task_targets

MAX_ROUNDS = 3
OUTPUT_MAX_TOKENS = {"classify": 16, "extract": 160, "transform": 128}  # one answer of each kind, teacher and student
OVERGENERATE = 1.5  # inputs asked per missing example: some are dropped as duplicates or low-agreement
ROUND_STRIDE = 1_000_000
# Few-shot picks and orders per round for the teacher's input prompts. One per input made every prompt
# unique after its first line, so the input stage decoded ~90 prompt tokens per ~8-token input; with a
# few, inputs of one label (or of one extract task) share their whole few-shot block in the KV cache
# (one profile: the input stage 16.5 s -> 12.3 s, the smart-home spec 42 s -> 33 s, as many kept).
# Variety comes from the sampling, the axes and the edge cases; each round draws new orders.
SHOT_ORDERS = 4
OUTPUT_OFFSET = 500_000
MAX_SAMPLES = 20  # the spec's limit on self-consistency samples: answer indices are input index x 20 + k



def _params(sampling: Any, defaults: dict[str, Any]) -> SamplingParams:
    """The spec's sampling settings over defaults (None = not set)."""
    return SamplingParams(**{**defaults, **{k: v for k, v in sampling.model_dump().items() if v is not None}})


def input_params(spec: Any) -> SamplingParams:
    return _params(spec.sampling.inputs, {"temperature": 0.9, "max_tokens": 48, "stop": INPUT_STOP})


def output_params(spec: Any, task: Task) -> SamplingParams:
    samples = spec.self_consistency.samples
    defaults = {"temperature": 0.7 if samples > 1 else 0.0, "max_tokens": OUTPUT_MAX_TOKENS[task.kind],
                "stop": stop_strings(task)}
    return _params(spec.sampling.outputs, defaults)


@dataclass
class Answer:
    """The teacher's answers for one input: the majority and how many samples agreed."""

    input_index: int
    task: str
    input: str
    intended: str | None
    votes: list[str | None]
    generation_ids: list[int]
    majority: str | None = None
    agreement: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ planning


def _input_items(loaded: LoadedTaskSpec, round_no: int, deficits: dict[tuple[str, str | None], int], style: PromptStyle) -> list[Item]:
    spec = loaded.spec
    items: list[Item] = []
    base = round_no * ROUND_STRIDE
    orders = item_seeds(spec.seed, SHOT_ORDERS, start=base + ROUND_STRIDE // 2)  # indices no item of the round takes
    for (task_name, label), missing in sorted(deficits.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        task = spec.task(task_name)
        n = max(1, int(missing * OVERGENERATE + 0.999))
        for j in range(n):
            index = base + len(items)
            seed = item_seeds(spec.seed, 1, start=index)[0]
            rng = random.Random(seed)
            axes = {name: rng.choice(values) for name, values in sorted(task.axes.items())}
            roll = rng.random()
            edge_share = task.edge_case_share if task.edge_cases else 0.0
            edge = rng.choice(task.edge_cases) if roll < edge_share else None
            hard = None
            if isinstance(task, ClassifyTask) and edge_share <= roll < edge_share + task.hard_negative_share:
                confusable = task.confusable(label)
                hard = rng.choice(confusable) if confusable else None
            shots = orders[rng.randrange(SHOT_ORDERS)]  # drawn last: the axes, edge case and hard negative are as before
            prompt = render_input_prompt(task, label=label, axes_values=axes, edge_case=edge, hard_negative=hard, seed=shots,
                                         prompt=loaded.input_prompts.get(task.name), chat=style.chat)
            variables = {"phase": "input", "round": round_no, "task": task.name, "label": label, **axes}
            if edge:
                variables["edge_case"] = edge
            if hard:
                variables["hard_negative"] = hard
            items.append(style.message_item(prompt, index=index, seed=seed, variables=variables))
    return items


def task_item(task: Task, text: str, style: PromptStyle, **fields: Any) -> Item:
    """One request for `task`'s output on `text`, as the teacher and the student are both asked it:
    the few-shot completion prompt, or its chat form; the grammar constrains only the answer."""
    prompt = task_messages(task, text) if style.chat else render_task_prompt(task, text)
    return style.message_item(prompt, grammar=output_constraint(task, chat=style.chat), **fields)


def _output_items(loaded: LoadedTaskSpec, round_no: int, inputs: list[tuple[int, Task, str]], style: PromptStyle) -> list[Item]:
    """The k answers to each input, all tasks together (so batches stay full across tasks); their indices
    follow from the input's, so no two tasks' answers collide. The k answers of one input share its
    prompt, which the engine decodes once."""
    spec = loaded.spec
    items = []
    base = round_no * ROUND_STRIDE
    for input_index, task, text in inputs:
        params = output_params(spec, task)
        for k in range(spec.self_consistency.samples):
            index = base + OUTPUT_OFFSET + (input_index - base) * MAX_SAMPLES + k
            items.append(task_item(task, text, style, index=index, seed=item_seeds(spec.seed, 1, start=index)[0], params=params,
                                   variables={"phase": "output", "round": round_no, "task": task.name, "input_index": input_index, "sample": k}))
    return items


# ---------------------------------------------------------------------------------------------- run


def _find_run(store: Store, loaded: LoadedTaskSpec, resume: int | None, new_run: bool, style: PromptStyle) -> tuple[int | None, bool]:
    run = find_resumable(
        store, name=loaded.spec.name, kinds=("task",), sha256=loaded.sha256,
        config=("spec", loaded.spec.model_dump(by_alias=True)), what="task spec", resume=resume, new_run=new_run,
    )
    if run:
        style.check_resume(run)
    return (run["id"], run["status"] == "completed") if run else (None, False)


def run_task_spec(
    store: Store,
    registry: Registry,
    loaded: LoadedTaskSpec,
    *,
    resume: int | None = None,
    new_run: bool = False,
    n_parallel: int | None = None,
    mode: str | None = None,
    chat_template: str | None = None,
    events: RunEvents | None = None,
    cluster: Any = None,
) -> RunSummary:
    spec = loaded.spec
    ratios = parse_split_spec(spec.split)
    record = registry.resolve(spec.model)
    if cluster is not None:
        registry.ensure_sha256(record)  # the nodes' copies are checked against it
    # The built-in task prompts come in both forms, so auto means chat whenever a template is there.
    style = style_for(record, mode=mode or spec.mode, chat_template=chat_template or spec.chat_template, fewshot=False)
    run_id, complete = _find_run(store, loaded, resume, new_run, style)
    resumed = run_id is not None and not complete
    goals = _goals(spec)

    if complete:  # its examples stand as stored (an eval's predictions may point at them): nothing is judged again
        assert run_id is not None
        summary = summarize(store, run_id)
        summary.already_complete, summary.table_lines = True, _counts_table(store, run_id, goals)
        return summary

    rubric = load_rubric(spec.judge, loaded.resolve, registry, record, where=f"task spec {loaded.path}",
                         chat_template=chat_template or spec.chat_template) if spec.judge else None
    answers: list[Answer] = []
    executions = []
    with RunSession(store, record, events=events, n_parallel=n_parallel, cluster=cluster) as session:
        for round_no in range(MAX_ROUNDS):
            have = _kept_counts(answers, spec)
            deficits = {key: goal - have.get(key, 0) for key, goal in goals.items() if goal - have.get(key, 0) > 0}
            if not deficits:
                break
            items = _input_items(loaded, round_no, deficits, style)
            if session.run_id is None:
                session.prepare(_workloads(loaded, items, style))
                if run_id is None:
                    run_id = session.begin(
                        kind="task", name=spec.name, recipe_sha256=loaded.sha256, model_id=record.id,
                        model_sha256=registry.ensure_sha256(record), requested=spec.count,
                        params={"inputs": input_params(spec).model_dump(), "seed": spec.seed},
                        config={"spec_path": loaded.path, "spec": spec.model_dump(by_alias=True)}, **style.run_fields(),
                    )
                else:
                    session.attach(run_id)
            executions.append(session.generate(items, input_params(spec)))
            inputs = _new_inputs(store, session.run_id, items, spec, answers)
            batch = _output_items(loaded, round_no, inputs, style)
            if batch:
                executions.append(session.generate(batch, batch[0].params or input_params(spec)))
            answers += _collect(store, session.run_id, loaded, round_no, inputs)
        if session.run_id is None:
            raise ApplianceError("the task spec produced no items")
        run_id = session.run_id
        scores = _rubric_scores(session, loaded, rubric, answers, executions) if rubric else {}
        _judge_and_store(store, run_id, loaded, answers, goals, ratios, scores)
        for message in _shortfalls(store, run_id, spec, goals):
            session.event("warning", message)
        session.complete()
        loads = session.loads
    summary = summarize(store, run_id)
    summary.resumed, summary.already_complete = resumed, complete
    summary.table_lines = _counts_table(store, run_id, goals)
    summary.execution = merge(executions)
    summary.model_loads = loads
    return summary


def _goals(spec: Any) -> dict[tuple[str, str | None], int]:
    """Examples to keep per (task, label) (classify) or per (task, None): the spec's targets."""
    targets = task_targets(spec)
    out: dict[tuple[str, str | None], int] = {}
    for task in spec.tasks:
        if task.kind == "classify":
            out.update({(task.name, label): n for label, n in label_targets(task, targets[task.name]).items()})
        else:
            out[(task.name, None)] = targets[task.name]
    return out


def _workloads(loaded: LoadedTaskSpec, inputs: list[Item], style: PromptStyle) -> list[Workload]:
    """What the run will ask, for one plan that fits every stage: the input prompts, and each task's answer
    prompt around an input as long as an input may be (the inputs' max_tokens in words)."""
    spec = loaded.spec
    n = input_params(spec).max_tokens
    long_inputs = [" ".join([word] * n) for word in ("one", "two")]  # two, so only the few-shot part is shared
    out: list[Workload] = [([it.prompt for it in inputs], input_params(spec))]
    for task in spec.tasks:
        out.append(([task_item(task, text, style, index=0, seed=0).prompt for text in long_inputs], output_params(spec, task)))
    return out


def _new_inputs(store: Store, run_id: int, items: list[Item], spec, answers: list[Answer]) -> list[tuple[int, Task, str]]:
    """This round's usable inputs: non-empty, not prompt scaffolding copied into the input, and not a
    near-duplicate of an earlier input of the task or of the few-shot examples (which would leak the
    prompt into the test split)."""
    rows = {r["item_index"]: r for r in store.rows(
        "SELECT item_index, output FROM generations WHERE run_id = ? AND item_index BETWEEN ? AND ?",
        [run_id, items[0].index, items[-1].index])}
    index: dict[str, NearDuplicateIndex] = defaultdict(NearDuplicateIndex)
    for task in spec.tasks:
        for j, example in enumerate(task.example_inputs()):
            index[task.name].insert(f"example {j}", example)
    for a in answers:
        index[a.task].insert(str(a.input_index), a.input)
    out = []
    for it in items:
        text = (parse_input(rows[it.index]["output"]) or "") if it.index in rows else ""
        task = spec.task(it.variables["task"])
        axes = {k: v for k, v in it.variables.items() if k in task.axes}
        if not text or copied_scaffold(task, text, axes_values=axes, edge_case=it.variables.get("edge_case")):
            continue
        if index[task.name].add(str(it.index), text) is None:
            out.append((it.index, task, text))
    return out


def _collect(store: Store, run_id: int, loaded: LoadedTaskSpec, round_no: int, inputs: list[tuple[int, Task, str]]) -> list[Answer]:
    lo = round_no * ROUND_STRIDE
    rows = store.rows(
        "SELECT id, item_index, output, variables_json FROM generations WHERE run_id = ? AND item_index >= ? AND item_index < ? ORDER BY item_index",
        [run_id, lo, lo + ROUND_STRIDE])
    intended = {r["item_index"]: json.loads(r["variables_json"]).get("label") for r in rows if r["item_index"] < lo + OUTPUT_OFFSET}
    votes: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for r in rows:
        v = json.loads(r["variables_json"])
        if v.get("phase") == "output":
            votes[v["input_index"]].append((r["id"], r["output"]))
    out = []
    for input_index, task, text in inputs:
        samples = votes.get(input_index, [])
        answer = Answer(input_index, task.name, text, intended.get(input_index),
                        [parse_output(task, s) for _, s in samples], [g for g, _ in samples])
        valid = [v for v in answer.votes if v is not None]
        if valid:
            answer.majority, n = Counter(valid).most_common(1)[0]
            answer.agreement = n / max(1, len(answer.votes))
        out.append(answer)
    return out


def _kept_counts(answers: list[Answer], spec) -> Counter:
    counts: Counter = Counter()
    for a in answers:
        task = spec.task(a.task)
        if _agreed(a, spec):
            counts[(a.task, a.majority if task.kind == "classify" else None)] += 1
    return counts


# ------------------------------------------------------------------------------------------- judging


def _agreed(a: Answer, spec: Any) -> bool:
    """An answer the teacher agreed on, as it was asked for (what the rubric judge scores)."""
    return a.majority is not None and a.agreement >= spec.self_consistency.min_agreement and a.intended in (None, a.majority)


def _rubric_scores(session: RunSession, loaded: LoadedTaskSpec, rubric: Rubric, answers: list[Answer],
                   executions: list[Any]) -> dict[int, Verdict]:
    """The `[judge]` scores of the agreed answers (those not scored yet are scored now, after every round), by
    the answer's first output generation. Judge drops are not refilled by another round."""
    store, run_id = session.store, session.run_id
    gens = {r["id"]: r["item_index"] for r in store.rows("SELECT id, item_index FROM generations WHERE run_id = ? AND item_index < ?",
                                                         [run_id, JUDGE_BASE])}
    judged = [Judged(a.generation_ids[0], gens[a.generation_ids[0]], loaded.spec.task(a.task).system, a.majority or "", a.input)
              for a in sorted(answers, key=lambda a: a.input_index) if a.generation_ids and _agreed(a, loaded.spec)]
    executions.append(run_judge(session, rubric, judged, loaded.spec.seed))
    return judge_verdicts(rubric.config, store.rows(
        "SELECT item_index, output, finish_reason, variables_json FROM generations WHERE run_id = ? AND item_index >= ?",
        [run_id, JUDGE_BASE]))


def _judge_and_store(store: Store, run_id: int, loaded: LoadedTaskSpec, answers: list[Answer],
                     goals: dict[tuple[str, str | None], int], ratios: dict[str, float], scores: dict[int, Verdict]) -> None:
    spec = loaded.spec
    taken: Counter = Counter()
    ranked = sorted(answers, key=lambda a: (-a.agreement, a.input_index))  # most confident first when capping
    for a in ranked:
        task = spec.task(a.task)
        n_valid = sum(v is not None for v in a.votes)
        a.verdicts.append(Verdict(filter="valid", passed=a.majority is not None, score=n_valid / max(1, len(a.votes)),
                                  reason=f"{n_valid} of {len(a.votes)} answers are valid {task.kind} outputs"))
        if a.majority is not None:
            minimum = spec.self_consistency.min_agreement
            ok = a.agreement >= minimum
            a.verdicts.append(Verdict(filter="agreement", passed=ok, score=a.agreement,
                                      reason=f"{a.agreement:.0%} of {len(a.votes)} samples agree (minimum {minimum:.0%})"))
            if ok and a.intended is not None:
                ok = a.majority == a.intended
                a.verdicts.append(Verdict(filter="intent", passed=ok, reason=(
                    f"written as {a.intended}, labelled {a.majority}" if not ok else f"written and labelled as {a.intended}")))
            if ok and a.generation_ids and a.generation_ids[0] in scores:  # before balance: a dropped answer takes no place
                a.verdicts.append(scores[a.generation_ids[0]])
                ok = scores[a.generation_ids[0]].passed
            if ok:
                key = (task.name, a.majority if task.kind == "classify" else None)
                if taken[key] >= goals.get(key, 0):
                    a.verdicts.append(Verdict(filter="balance", passed=False, reason=f"{key[1] or task.name} already has its {goals.get(key, 0)} examples"))
                else:
                    taken[key] += 1
    kept = [a for a in answers if a.majority is not None and all(v.passed for v in a.verdicts)]
    examples = [Example(id=str(a.input_index), instruction=a.input, output=a.majority or "", system=spec.task(a.task).system,
                        group=f"{a.task}:{a.input_index}", label=f"{a.task}:{a.majority}" if spec.task(a.task).kind == "classify" else a.task)
                for a in kept]
    split_of: dict[str, str] = {}
    sketches = ExampleSketches(examples)  # each kept example's MinHash: split on, and stored for export
    if examples:
        for name, part in split_examples(examples, ratios, seed=spec.seed, sketches=sketches).items():
            split_of.update({ex.id: name for ex in part})
    with store.transaction() as conn:
        conn.execute("DELETE FROM verdicts WHERE run_id = ?", [run_id])
        conn.execute("DELETE FROM examples WHERE run_id = ?", [run_id])
        for a in sorted(answers, key=lambda a: a.input_index):
            gen_id = a.generation_ids[0] if a.generation_ids else _input_generation(conn, run_id, a.input_index)
            for v in a.verdicts:
                insert_row(conn, "verdicts", {"run_id": run_id, "generation_id": gen_id, "filter": v.filter,
                                              "passed": int(v.passed), "score": v.score, "reason": v.reason,
                                              "detail_json": to_json(v.detail) if v.detail is not None else None})
            task = spec.task(a.task)
            keep = a.majority is not None and all(v.passed for v in a.verdicts)
            insert_row(conn, "examples", {
                "run_id": run_id, "generation_id": gen_id, "chunk_id": None, "instruction": a.input, "input": "",
                "output": a.majority or "", "system": task.system, "task": task.name,
                "label": a.majority if task.kind == "classify" else None, "confidence": a.agreement,
                "group_key": f"{task.name}:{a.input_index}", "kept": int(keep),
                "split": split_of.get(str(a.input_index)) if keep else None, "created_at": utcnow(),
                "minhash": sketches.blob(str(a.input_index)) if keep else None,
            })


def _input_generation(conn, run_id: int, input_index: int) -> int:
    return conn.execute("SELECT id FROM generations WHERE run_id = ? AND item_index = ?", [run_id, input_index]).fetchone()[0]


def _counts_table(store: Store, run_id: int, goals: dict[tuple[str, str | None], int]) -> list[str]:
    """Kept examples per task/label against their targets, and per split."""
    rows = store.rows("SELECT task, label, split, count(*) n FROM examples WHERE run_id = ? AND kept = 1 GROUP BY task, label, split", [run_id])
    splits = sorted({r["split"] for r in rows if r["split"]})
    lines = [f"{'task/label':<28} {'kept':>4} / target  " + "  ".join(f"{s:>10}" for s in splits)]
    for (task, label), goal in goals.items():
        mine = [r for r in rows if r["task"] == task and r["label"] == label]
        per_split = {r["split"]: r["n"] for r in mine}
        name = f"{task}/{label}" if label else task
        lines.append(f"{name:<28} {sum(r['n'] for r in mine):>4} / {goal:<6}  " + "  ".join(f"{per_split.get(s, 0):>10}" for s in splits))
    return lines


def _shortfalls(store: Store, run_id: int, spec, goals: dict[tuple[str, str | None], int]) -> list[str]:
    """Labels (or tasks) whose kept count is outside the spec's balance tolerance."""
    have = Counter()
    for r in store.rows("SELECT task, label, count(*) n FROM examples WHERE run_id = ? AND kept = 1 GROUP BY task, label", [run_id]):
        have[(r["task"], r["label"])] = r["n"]
    out = []
    for (task_name, label), goal in goals.items():
        tolerance = spec.balance.tolerance
        n = have.get((task_name, label), 0)
        if n < spec.balance.bounds(goal)[0]:
            out.append(f"{task_name}{'/' + label if label else ''}: {n} of {goal} examples after {MAX_ROUNDS} rounds (tolerance {tolerance:.0%})")
    return out
