"""A run's summary, for every run kind: what it asked for, made, kept and dropped (each dropped example
under the first filter it failed), the empty outputs made again, the fidelity rate per checked axis and
the echo statistics of annotated runs. `run`, `export`, `report` and the Python API all read it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ApplianceError
from ..store import Store, command_prefix
from .items import FIDELITY_BASE, ITEM_LIMIT, MAX_TURNS, RECIPE_KINDS, Execution
from .queries import first_failures

RETRYING_KINDS = ("synthetic", "annotated", "augmented")  # the others use the item indices of retries for their own items


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
    advice: list[str] = field(default_factory=list)  # what to change when a filter dropped outputs for a reason the user set
    judge: JudgeStats | None = None  # the rubric judge's scores, for runs with a [judge]
    turns: dict[int, int] = field(default_factory=dict)  # conversation runs: kept conversations per number of turns

    def why_nothing(self) -> str:
        if self.kept or not self.generated:
            return ""
        if not self.dropped:
            return "kept nothing: no example has been judged yet (run it again to finish it)"
        parts = [f"{n} by {name} (e.g. {self.first_reasons[name]})" for name, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        return "kept nothing: dropped " + "; ".join(parts)


def summarize(store: Store, run_id: int) -> RunSummary:
    rows = store.rows("SELECT * FROM runs WHERE id = ?", [run_id])
    if not rows:
        raise ApplianceError(f"no run {run_id} (see `{command_prefix(store.path)} runs`)")
    run = rows[0]
    recipe_run = run["kind"] in RECIPE_KINDS
    conversation = run["kind"] == "conversation"  # its indices above ITEM_LIMIT are later turns, not retries or checks
    generated = store.rows("SELECT count(*) n FROM generations WHERE run_id = ?" + (" AND item_index < ?" if recipe_run else ""),
                           [run_id] + ([ITEM_LIMIT] if recipe_run else []))[0]["n"]  # the items, not their retries or checks
    retried = store.rows("SELECT count(*) n FROM generations WHERE run_id = ? AND item_index >= ? AND item_index < ?",
                         [run_id, ITEM_LIMIT, FIDELITY_BASE])[0]["n"] if run["kind"] in RETRYING_KINDS else 0
    kept = store.rows("SELECT count(*) n FROM examples WHERE run_id = ? AND kept = 1", [run_id])[0]["n"]
    dropped, reasons = first_failures(store, run_id)
    echo = None
    if run["kind"] == "annotated":
        # imported here: only an annotated run's summary measures echoes, and the filters import pydantic (40 ms
        # of every `export`, which reads a summary)
        from ..data.filters import echo_metrics, summarize_echo

        pairs = store.rows("SELECT instruction, output FROM examples WHERE run_id = ? AND instruction != ''", [run_id])
        echo = summarize_echo([echo_metrics(r["instruction"], r["output"]) for r in pairs]) if pairs else None
    skipped = [tuple(m["message"].split(": ", 1)) for m in store.rows(
        "SELECT message FROM run_events WHERE run_id = ? AND message LIKE 'skipped source %'", [run_id])]
    turns, lines = conversation_counts(store, run) if conversation else ({}, [])
    return RunSummary(run_id, run["kind"], run["status"], run["requested"], generated, kept, dropped, reasons, echo,
                      [(p.removeprefix("skipped source "), r) for p, r in skipped], retried=retried,
                      fidelity=fidelity_rates(store, run_id) if recipe_run and not conversation else {},
                      advice=truncation_advice(store, run) if dropped.get("truncated") else [],
                      judge=judge_stats(store, run_id), table_lines=lines, turns=turns)


@dataclass
class JudgeStats:
    """The rubric judge's scores of a run: how many outputs it scored, how many reached the threshold, and
    per criterion how many outputs got each score (every score of the scale, 0 where none)."""

    scored: int
    passed: int
    counts: dict[str, dict[int, int]]  # criterion -> score -> outputs
    threshold: float | None = None

    def mean(self, criterion: str) -> float:
        c = self.counts[criterion]
        n = sum(c.values())
        return sum(score * k for score, k in c.items()) / n if n else 0.0

    def line(self) -> str:
        means = ", ".join(f"{name} {self.mean(name):.2f}" for name in self.counts)
        at = f" >= {self.threshold:g}" if self.threshold is not None else ""
        return f"judge: {self.scored} scored, {self.passed} with a mean{at}; mean per criterion: {means}"


def judge_stats(store: Store, run_id: int) -> JudgeStats | None:
    """The judge's score distribution (None for a run with no judge verdicts). The scale and threshold come
    from the run's `[judge]` table (a recipe's or a task spec's)."""
    rows = store.rows("SELECT passed, detail_json FROM verdicts WHERE run_id = ? AND filter = 'judge'", [run_id])
    if not rows:
        return None
    config = json.loads(store.rows("SELECT config_json FROM runs WHERE id = ?", [run_id])[0]["config_json"] or "{}")
    table = (config.get("recipe") or config.get("spec") or {}).get("judge") or {}
    low, high = (table.get("scale") or [1, 5])
    details = [json.loads(r["detail_json"]) for r in rows if r["detail_json"]]
    names = [c["name"] for c in table.get("criteria", [])] or sorted({k for d in details for k in d})
    counts = {name: {score: 0 for score in range(low, high + 1)} for name in names}
    for d in details:
        for name, score in d.items():
            counts.setdefault(name, {})
            counts[name][score] = counts[name].get(score, 0) + 1
    threshold = table.get("threshold")
    return JudgeStats(len(details), sum(r["passed"] for r in rows if r["detail_json"]), counts,
                      threshold if threshold is not None else (low + high) / 2)


def conversation_counts(store: Store, run: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """A conversation run's kept conversations per number of turns, and its summary lines: conversations
    started, kept and cut short; turns and messages generated."""
    rows = store.rows("SELECT item_index FROM generations WHERE run_id = ? AND item_index < ?", [run["id"], 2 * MAX_TURNS * ITEM_LIMIT])
    started = sum(r["item_index"] < ITEM_LIMIT for r in rows)
    answered = sum((r["item_index"] // ITEM_LIMIT) % 2 for r in rows)
    turns: dict[int, int] = {}
    for r in store.rows("SELECT messages_json FROM examples WHERE run_id = ? AND kept = 1 AND messages_json IS NOT NULL", [run["id"]]):
        n = len(json.loads(r["messages_json"])) // 2
        turns[n] = turns.get(n, 0) + 1
    asked = (json.loads(run["config_json"] or "{}").get("recipe") or {}).get("turns") or 0
    cut = sum(n for k, n in turns.items() if k < asked)
    per = ", ".join(f"{k} turn{'s' if k != 1 else ''}: {n}" for k, n in sorted(turns.items())) or "none kept"
    return dict(sorted(turns.items())), [
        f"conversations: {started} started, {sum(turns.values())} kept" + (f" ({cut} cut after their last good exchange)" if cut else ""),
        f"turns: {answered} answered ({len(rows)} messages, user and assistant); turns per kept conversation: {per}",
    ]


def truncation_advice(store: Store, run: dict[str, Any]) -> list[str]:
    """The fix for outputs dropped as cut off at the token limit: the limit the run used and the lengths seen."""
    params = json.loads(run["params_json"] or "{}")
    limit = params.get("max_tokens")
    if run["kind"] == "conversation":  # every turn of every conversation; each side has its own limit
        limit = f"{limit} (answers), {(params.get('user') or {}).get('max_tokens')} (user messages)"
        rows = store.rows("SELECT finish_reason, tokens_out FROM generations WHERE run_id = ? AND item_index < ?",
                          [run["id"], 2 * MAX_TURNS * ITEM_LIMIT])
    else:  # the generations examples are made of (a magpie run's answers sit above ITEM_LIMIT, after their requests)
        rows = store.rows("SELECT g.finish_reason, g.tokens_out FROM examples e JOIN generations g ON g.id = e.generation_id "
                          "WHERE e.run_id = ?", [run["id"]])
    cut = sum(r["finish_reason"] == "length" for r in rows)
    ended = sorted(r["tokens_out"] for r in rows if r["finish_reason"] != "length")
    seen = (f"the {len(ended)} that ended on their own used {ended[0]}-{ended[-1]} tokens (median {ended[len(ended) // 2]})"
            if ended else "none ended on its own")
    return [f"{cut} of {len(rows)} outputs stopped at max_tokens = {limit}; {seen}: raise max_tokens ([sampling] in the recipe) "
            "so answers can finish, or set [filters] allow_truncated = true to keep cut-off outputs"]


def fidelity_labels(gens: list[dict[str, Any]]) -> dict[int, dict[str, tuple[str, str | None]]]:
    """generation id -> {axis: (asked value, predicted value or None)} from a run's fidelity check
    generations (item indices from FIDELITY_BASE; `appliance.recipes.fidelity` makes them)."""
    out: dict[int, dict[str, tuple[str, str | None]]] = {}
    for g in gens:
        if g["item_index"] < FIDELITY_BASE:
            continue
        v = json.loads(g["variables_json"] or "{}")
        if v.get("check") != "fidelity":
            continue
        predicted = g["output"].strip() or None
        out.setdefault(v["generation_id"], {})[v["axis"]] = (v["expected"], predicted)
    return out


def fidelity_checks(store: Store, run_id: int) -> dict[int, dict[str, tuple[str, str | None]]]:
    """`fidelity_labels` of a run's stored check generations."""
    return fidelity_labels(store.rows(
        "SELECT item_index, output, variables_json FROM generations WHERE run_id = ? AND item_index >= ?", [run_id, FIDELITY_BASE]))


def fidelity_rates(store: Store, run_id: int) -> dict[str, tuple[int, int]]:
    """Per checked axis: (outputs labelled with the value asked for, outputs checked)."""
    out: dict[str, tuple[int, int]] = {}
    for found in fidelity_checks(store, run_id).values():
        for axis, (asked, predicted) in found.items():
            hit, n = out.get(axis, (0, 0))
            out[axis] = (hit + (predicted == asked), n + 1)
    return dict(sorted(out.items()))
