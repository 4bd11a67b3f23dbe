"""`appliance export`: a run's kept examples out, one file per split in a fine-tuning format, and a
dataset card beside them. Formats, splits and the card are `appliance.data`'s; this module decides which
splits a run is exported with (a task run's stored ones, unless asked to split again)."""

from __future__ import annotations

import functools
import gc
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from .data.card import card_lines, dataset_card, prompts_used
from .data.examples import (
    PREFERENCE_FORMATS,
    ExampleColumns,
    ExportError,
    check_format,
    dedup_text,
    write_jsonl,
)
from .data.sketches import read_sketches
from .data.splits import cross_split_rows, parse_split_spec, split_rows
from .errors import ApplianceError, StoreError, with_article
from .runs.summary import summarize
from .store import Store, command_prefix, utcnow
from .store.database import describe_sqlite_error


@dataclass
class ExportResult:
    files: dict[str, tuple[Path, int]]  # split -> (file, rows)
    card: Path
    dropped: dict[str, int]


def _spec(ratios: dict[str, float]) -> str:
    return ",".join(f"{name}={ratio:g}" for name, ratio in ratios.items())


def stored_splits(store: Store, run_id: int, splits: Iterable[str | None]) -> dict[str, float] | None:
    """The split ratios a run stored its examples under (task runs; `eval` scores the stored test split),
    else None. `splits`: the stored split of each of its kept examples (None where it has none)."""
    names = sorted({name for name in splits if name is not None})
    if not names:
        return None
    run = store.rows("SELECT config_json FROM runs WHERE id = ?", [run_id])[0]
    spec = (json.loads(run["config_json"] or "{}").get("spec") or {}).get("split")
    ratios = parse_split_spec(spec) if spec else {}
    return {**ratios, **{name: 0.0 for name in names if name not in ratios}}


def _gc_paused(fn: Callable[..., ExportResult]) -> Callable[..., ExportResult]:
    """`fn` with Python's cyclic garbage collector paused: an export makes an object or more per example (100k
    at 100k items), none in a reference cycle, and every full collection walked all of them again."""
    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> ExportResult:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return paused


@_gc_paused
def export_run(store: Store, run_id: int, fmt: str, out: Path, split: str | None = None, seed: int = 0,
               resplit: bool = False, force: bool = False) -> ExportResult:
    """Write the run's kept examples in `fmt`, one file per split (`NAME.train.jsonl`, ...), and a
    dataset card beside them (`NAME.card.md`). Files that exist already are refused unless `force`.

    A run that stored splits (a task run) is exported as stored, so no example `eval` tests on lands in
    a training file; a different `split` is refused unless `resplit`, which the card records."""
    check_format(fmt)
    ratios = parse_split_spec(split) if split else None
    if resplit and not ratios:
        raise ExportError("--resplit needs --split NAME=RATIO,... to say how to split again")
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: folder {out.parent} does not exist")
    summary = summarize(store, run_id)
    if summary.kind in ("generate", "eval"):
        raise ExportError(f"run {run_id} is {with_article(summary.kind)} run with no dataset examples; export recipe and task runs "
                          f"(`{command_prefix(store.path)} logs --run {run_id} --json` lists its outputs)")
    examples, stored_split, minhashes = _kept_examples(store, run_id)
    stored = stored_splits(store, run_id, stored_split)
    if stored and ratios and not resplit and (set(ratios) != set(stored) or any(abs(ratios[n] - stored[n]) > 1e-9 for n in ratios)):
        raise ExportError(f"run {run_id} stored its splits ({_spec(stored)}; `eval` tests on them): export without --split "
                          f"to keep them, or add --resplit to split again (the card records it)")
    if not examples:
        why = summary.why_nothing() or "the run has no examples yet (run its recipe first)"
        raise ExportError(f"run {run_id} has nothing to export: {why}")
    if fmt in PREFERENCE_FORMATS and None in examples.rejected:
        raise ExportError(f"format {fmt} needs preference pairs (chosen and rejected): run {run_id} is {with_article(summary.kind)} "
                          "run; export a preference recipe's run, or choose openai, sharegpt, alpaca or jsonl")
    # the stored MinHashes (the missing ones computed), read once if a split or the cross-split count needs them
    sketches = functools.cache(lambda: read_sketches(minhashes, lambda row: dedup_text(examples.example(row))))
    how: str
    rows: dict[str, Sequence[int]]  # each split's rows of `examples`, in the order written
    if stored and not resplit:
        rows = {name: [i for i, where in enumerate(stored_split) if where == name] for name in stored}
        how = f"as stored by run {run_id} ({_spec(stored)}), the splits `eval` uses"
    elif ratios:
        rows = split_rows(examples.id, examples.group, examples.label, sketches(), ratios, seed=seed)
        how = f"made at export: {_spec(ratios)}, seed {seed}"
        if stored:
            how += (f"; RE-SPLIT with --resplit, ignoring the run's stored splits ({_spec(stored)}): "
                    f"`eval --dataset {run_id}` scores the stored test split, which these files may train on")
    else:
        rows = {"all": range(len(examples))}
        how = "none (one file)"
    splits = {name: examples.take(part) for name, part in rows.items()}
    paths = {name: out if list(splits) == ["all"] else out.with_name(f"{out.stem}.{name}{out.suffix or '.jsonl'}") for name in splits}
    card = out.with_name(f"{out.stem}.card.md")
    existing = [str(p) for p in [*paths.values(), card] if p.exists()]
    if existing and not force:
        raise ExportError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''} already (an earlier export?): "
                          "add --force to replace, or choose another --out")
    files = {name: (paths[name], write_jsonl(paths[name], part, fmt)) for name, part in splits.items()}
    run = store.rows("SELECT r.name, r.kind, m.name AS model FROM runs r LEFT JOIN models m ON m.id = r.model_id WHERE r.id = ?", [run_id])[0]
    crossing, total = cross_split_rows(rows, sketches()) if len(splits) > 1 else (0, 0)
    provenance = card_lines(store, run_id) + [
        f"- splits: {how}",
        "- near-duplicates across splits: " + (f"{crossing} of {total} examples ({crossing / total:.1%}) have a near-duplicate "
                                               "(MinHash Jaccard >= 0.8) in another split" if total else "n/a (one split)"),
        f"- exported {utcnow()}",
    ]
    extra: dict[str, Any] = {"run": run_id, "kind": run["kind"], "model": run["model"],
                             "generated": summary.generated, "kept": summary.kept}
    if summary.retried:
        extra["empty outputs generated again with a new seed"] = summary.retried
    card.write_text(dataset_card(run["name"] or f"run {run_id}", splits, summary.dropped, fmt, extra,
                                 fidelity=summary.fidelity, provenance=provenance, prompts=prompts_used(store, run_id),
                                 labels=expected_labels(store, run_id), judge=summary.judge), encoding="utf-8")
    return ExportResult(files, card, summary.dropped)


# Columns of migrations 7 and 8: a database opened read-only is not migrated, so an older one lacks them (NULL here).
_OPTIONAL = ("messages_json", "rejected", "minhash")


def _kept_examples(store: Store, run_id: int) -> tuple[ExampleColumns, list[str | None], list[bytes | None]]:
    """The run's kept examples in item order, as columns, with each one's stored split and stored MinHash.
    Reads only the columns export uses, as tuples (not `e.*` as dicts: at 100k rows that was a fifth of the
    export), turned into columns at once (one object per example, and freeing it, was another fifth)."""
    have = {r["name"] for r in store.rows("SELECT name FROM pragma_table_info('examples')")}
    optional = ", ".join(f"e.{c}" if c in have else f"NULL AS {c}" for c in _OPTIONAL)
    sql = ("SELECT e.id, e.generation_id, e.chunk_id, e.instruction, e.input, e.output, e.system, e.group_key, e.label, "
           f"{optional}, g.seed, e.split, g.item_index FROM examples e JOIN generations g ON g.id = e.generation_id "
           "WHERE e.run_id = ? AND e.kept = 1 ORDER BY e.id")  # sorted by item here: SQLite sorted them slower
    try:
        rows = store.conn.execute(sql, [run_id]).fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(describe_sqlite_error(store.path, exc)) from None
    rows.sort(key=itemgetter(-1))
    (ids, generation_ids, chunk_ids, instructions, inputs, outputs, systems, groups, labels, messages, rejected, minhashes, seeds,
     splits, _) = map(list, zip(*rows)) if rows else ([] for _ in range(15))
    examples = ExampleColumns(
        id=list(map(str, ids)), instruction=instructions, input=inputs, output=outputs, system=systems, group=groups, label=labels,
        messages=[json.loads(m) if m else None for m in messages] if any(messages) else [None] * len(rows), rejected=rejected,
        meta=[{"run_id": run_id, "generation_id": g, "chunk_id": c, "seed": seed} for g, c, seed in zip(generation_ids, chunk_ids, seeds)])
    return examples, splits, minhashes


def expected_labels(store: Store, run_id: int) -> list[str]:
    """Every label a task run's spec asks examples for, as its examples carry them (`task:label` for classify
    tasks, the task name for the others), so the card lists a label that kept none; [] for other runs."""
    config = json.loads(store.rows("SELECT config_json FROM runs WHERE id = ?", [run_id])[0]["config_json"] or "{}")
    if "spec" not in config:
        return []
    # imported here: only a task run's export needs them (and what they import)
    from .tasks.kinds import ClassifyTask
    from .tasks.spec import parse_task_spec

    try:
        spec = parse_task_spec(config["spec"], "the run's stored spec")
    except (KeyError, ApplianceError):  # not a task run, or a spec this version cannot read: the labels seen
        return []
    return [f"{t.name}:{label.name}" for t in spec.tasks if isinstance(t, ClassifyTask) for label in t.labels] + [
        t.name for t in spec.tasks if not isinstance(t, ClassifyTask)]
