"""Queries over runs: generations (with full-text search) and runs, for `appliance logs` and `runs`; the
drops per first failing filter; which run a file continues; and what a user types next: which run a
reference names, how each run's counts read, how to continue it."""

from __future__ import annotations

import json
import shlex
from typing import Any

from ..errors import ApplianceError, ResumeError, with_article
from ..store import Store, command_prefix
from .items import ITEM_LIMIT, RECIPE_KINDS

_GENERATION_COLUMNS = """
    g.id, g.run_id, g.item_index, m.name AS model, p.name AS prompt, g.seed, g.tokens_in, g.tokens_out,
    g.ms, g.finish_reason, g.created_at, g.output, g.rendered_prompt, r.kind, g.variables_json
"""


def _fts_query(text: str) -> str:
    """Words of the user's query as quoted FTS5 terms (so punctuation cannot break the syntax)."""
    words = [w.replace('"', '""') for w in text.split()]
    if not words:
        raise ApplianceError("-q/--query needs at least one word")
    return " ".join(f'"{w}"' for w in words)


def search_generations(store: Store, *, limit: int = 3, query: str | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
    """Newest generations first, optionally matching a full-text query and/or one run.

    Each form reads only the rows it returns, newest first, so `-n 20` costs the same at 100k rows as at
    100: a run's rows come from the `generations_run_newest` index (migration 6), a query's from the FTS
    index walked in descending rowid order (FTS5 gives that order itself; `ORDER BY g.id` would sort
    every match first).
    """
    where, params = [], []
    source = "generations g"
    order = "g.id DESC"
    if query:
        source = "generations_fts f JOIN generations g ON g.id = f.rowid"
        order = "f.rowid DESC"
        where.append("generations_fts MATCH ?")
        params.append(_fts_query(query))
    joins = "JOIN runs r ON r.id = g.run_id LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = g.prompt_id"
    if run_id is not None:
        if not store.rows("SELECT 1 FROM runs WHERE id = ?", [run_id]):
            raise ApplianceError(f"no run {run_id} (see `{command_prefix(store.path)} runs`)")
        where.append("g.run_id = ?")
        params.append(run_id)
    sql = f"SELECT {_GENERATION_COLUMNS} FROM {source} {joins}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order}"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = store.rows(sql, params)
    for row in rows:
        row["variables"] = json.loads(row.pop("variables_json") or "null")
    return rows


def item_label(index: int, variables: dict[str, Any] | None) -> str:
    """How text output names an item: its `item_index` (the same number as in JSON and SQL), and for task
    and eval runs, whose indices encode round and phase, what the item is."""
    v = variables or {}
    if v.get("phase") == "input":
        label = f", label {v['label']}" if v.get("label") else ""
        return f"item {index} ({v.get('task')} input, round {v.get('round')}{label})"
    if v.get("phase") == "output":
        return f"item {index} ({v.get('task')} answer {v.get('sample')} to item {v.get('input_index')})"
    if "example_id" in v:
        return f"item {index} ({v.get('task')}, example {v['example_id']})"
    return f"item {index}"


_LABEL_KEYS = {"phase", "round", "task", "label", "input_index", "sample", "example_id", "check", "generation_id"}


def item_variables(variables: dict[str, Any] | None) -> str:
    """The values an output was made for (a recipe's axes, a prompt's variables), as one `k=v, ...` line;
    what `item_label` already says and the source passage (long) are left out."""
    shown = {k: v for k, v in (variables or {}).items() if k not in _LABEL_KEYS and k != "passage"}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def list_runs(store: Store, *, limit: int = 20) -> list[dict[str, Any]]:
    """Runs, newest first, with generations done, examples kept, and dropped examples per first failing filter."""
    kinds = ", ".join("?" * len(RECIPE_KINDS))
    sql = f"""
        SELECT r.id, r.kind, r.name, r.status, r.requested,
               (SELECT count(*) FROM generations g WHERE g.run_id = r.id
                AND (r.kind NOT IN ({kinds}) OR g.item_index < ?)) AS done,
               (SELECT count(*) FROM examples e WHERE e.run_id = r.id AND e.kept = 1) AS kept,
               m.name AS model, p.name AS prompt, r.started_at, r.ended_at, r.error, r.config_json
        FROM runs r LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = r.prompt_id
        ORDER BY r.id DESC"""
    if limit:
        sql += f" LIMIT {int(limit)}"
    runs = store.rows(sql, [*RECIPE_KINDS, ITEM_LIMIT])  # a recipe's items, not their retries or fidelity checks
    drops = drops_by_first_filter(store, [run["id"] for run in runs])
    prefix = command_prefix(store.path)
    for run in runs:
        run["dropped"] = {name: n for name, (n, _) in drops.get(run["id"], {}).items()}
        run["counts"] = run_counts(run)
        run["next"] = next_step(run, prefix) if run["status"] != "completed" else None
        del run["config_json"]
    return runs


def drops_by_first_filter(store: Store, run_ids: list[int]) -> dict[int, dict[str, tuple[int, str]]]:
    """run id -> {filter: (dropped examples, one reason)}: each dropped example counted once, under the
    first filter it failed; attempts generated again (no example of their own) are not drops."""
    if not run_ids:
        return {}
    marks = ", ".join("?" * len(run_ids))
    rows = store.rows(
        f"""SELECT first.run_id, v.filter, count(*) n, min(v.reason) reason FROM verdicts v JOIN (
               SELECT e.run_id, min(v2.id) id FROM examples e JOIN verdicts v2 ON v2.generation_id = e.generation_id AND v2.passed = 0
               WHERE e.run_id IN ({marks}) AND e.kept = 0 GROUP BY e.id) first ON first.id = v.id
            GROUP BY first.run_id, v.filter""", run_ids)
    out: dict[int, dict[str, tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["run_id"], {})[r["filter"]] = (r["n"], r["reason"])
    return out


def first_failures(store: Store, run_id: int) -> tuple[dict[str, int], dict[str, str]]:
    """One run's `drops_by_first_filter`: dropped examples per filter, and an example reason per filter."""
    drops = drops_by_first_filter(store, [run_id]).get(run_id, {})
    return {name: n for name, (n, _) in drops.items()}, {name: reason for name, (_, reason) in drops.items()}


def run_counts(run: dict[str, Any]) -> str:
    """A run's progress in the units its kind requests: a task run asks for examples and makes several
    generations for each, so its generations are never read against its request."""
    done, requested, kept, kind = run["done"], run["requested"], run["kept"], run["kind"]
    if kind == "generate":
        return f"{done}/{requested} outputs"
    if kind == "eval":
        return f"{done}/{requested} predictions"
    if kind == "task":
        return f"{done} generations, {kept}/{requested} examples kept"
    return f"{done}/{requested} generated, {kept} kept"


def next_step(run: dict[str, Any], prefix: str = "appliance") -> str:
    """The exact command that continues an unfinished run (a row of `runs` with id, kind, config_json), or,
    for the kinds that cannot be continued, that plainly and the command to run again. `prefix`:
    `command_prefix` of the run's database."""
    config = json.loads(run.get("config_json") or "{}")
    run_id, kind = run["id"], run["kind"]
    if kind == "generate":
        command = config.get("command") or []
        if "generate" in command:  # the command line as typed (with its own --db, if it had one)
            command = command[command.index("generate"):]
            again = f"`{prefix} {shlex.join(command)}`"
        else:
            again = f"the same `{prefix} generate` command"
        return f"a generate run cannot be resumed: run {again} again (a new run; run {run_id} keeps what it stored)"
    if kind == "eval":
        again = (f"`{prefix} eval {shlex.quote(str(config['student']))} --dataset {config['dataset_run']} "
                 f"--split {shlex.quote(str(config['split']))}`" if {"student", "dataset_run", "split"} <= set(config)
                 else f"the same `{prefix} eval` command")
        return f"an eval run cannot be resumed: run {again} again (a new run)"
    path = config.get("recipe_path") or config.get("spec_path")
    return f"resume with `{prefix} run {shlex.quote(path) if path else 'FILE'} --resume {run_id}`"


def interrupted_message(store: Store, run_id: int) -> str:
    """The one line a stopped run ends with: which run, what it kept, and the command that continues it."""
    run = store.rows("SELECT id, kind, status, config_json FROM runs WHERE id = ?", [run_id])[0]
    n = store.rows("SELECT count(*) n FROM generations WHERE run_id = ?", [run_id])[0]["n"]
    return f"interrupted: run {run_id} keeps {n} output{'' if n == 1 else 's'} stored so far; {next_step(run, command_prefix(store.path))}"


def resolve_run(store: Store, ref: str) -> int:
    """The run a user names: its id, `last` (the newest run), or a run name (its newest run, e.g. a recipe's
    `name`), so that instructions need no run id known in advance."""
    ref = ref.strip()
    if ref.isdigit():
        rows = store.rows("SELECT id FROM runs WHERE id = ?", [int(ref)])
    elif ref == "last":
        rows = store.rows("SELECT id FROM runs ORDER BY id DESC LIMIT 1")
    else:
        rows = store.rows("SELECT id FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1", [ref])
    if not rows:
        names = [r["name"] for r in store.rows("SELECT DISTINCT name FROM runs WHERE name IS NOT NULL ORDER BY name")]
        known = f"; run names: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else ""
        raise ApplianceError(f"no run {ref if ref.isdigit() else repr(ref)}: give a run id, `last` or a run name (see `{command_prefix(store.path)} runs`){known}")
    return rows[0]["id"]


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
            raise ResumeError(f"no run {resume} to resume (see `{command_prefix(store.path)} runs`)")
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
