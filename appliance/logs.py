"""Reading the log back: generations (with full-text search) and runs, for `appliance logs` and `runs`."""

from __future__ import annotations

from typing import Any

from .errors import ApplianceError
from .retry import ITEM_LIMIT
from .store import Store

_GENERATION_COLUMNS = """
    g.id, g.run_id, g.item_index, m.name AS model, p.name AS prompt, g.seed, g.tokens_in, g.tokens_out,
    g.ms, g.finish_reason, g.created_at, g.output, g.rendered_prompt
"""


def _fts_query(text: str) -> str:
    """Words of the user's query as quoted FTS5 terms (so punctuation cannot break the syntax)."""
    words = [w.replace('"', '""') for w in text.split()]
    if not words:
        raise ApplianceError("-q/--query needs at least one word")
    return " ".join(f'"{w}"' for w in words)


def search_generations(store: Store, *, limit: int = 3, query: str | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
    """Newest generations first, optionally matching a full-text query and/or one run."""
    where, params = [], []
    joins = "JOIN runs r ON r.id = g.run_id LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = g.prompt_id"
    if query:
        joins += " JOIN generations_fts f ON f.rowid = g.id"
        where.append("generations_fts MATCH ?")
        params.append(_fts_query(query))
    if run_id is not None:
        if not store.rows("SELECT 1 FROM runs WHERE id = ?", [run_id]):
            raise ApplianceError(f"no run {run_id} (see `appliance runs`)")
        where.append("g.run_id = ?")
        params.append(run_id)
    sql = f"SELECT {_GENERATION_COLUMNS} FROM generations g {joins}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY g.id DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return store.rows(sql, params)


def list_runs(store: Store, *, limit: int = 20) -> list[dict[str, Any]]:
    """Runs, newest first, with generations done, examples kept, and dropped examples per first failing filter."""
    sql = """
        SELECT r.id, r.kind, r.name, r.status, r.requested,
               (SELECT count(*) FROM generations g WHERE g.run_id = r.id
                AND (r.kind NOT IN ('synthetic', 'annotated', 'augmented') OR g.item_index < ?)) AS done,
               (SELECT count(*) FROM examples e WHERE e.run_id = r.id AND e.kept = 1) AS kept,
               m.name AS model, p.name AS prompt, r.started_at, r.ended_at, r.error
        FROM runs r LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = r.prompt_id
        ORDER BY r.id DESC"""
    if limit:
        sql += f" LIMIT {int(limit)}"
    runs = store.rows(sql, [ITEM_LIMIT])  # a recipe's items, not their retries or fidelity checks
    drops: dict[int, dict[str, int]] = {}
    first_failures = """SELECT e.run_id, min(v.id) id FROM examples e JOIN verdicts v ON v.generation_id = e.generation_id
                        AND v.passed = 0 WHERE e.kept = 0 GROUP BY e.id"""  # each dropped example once, by its first failure
    for row in store.rows(f"SELECT f.run_id, v.filter, count(*) n FROM ({first_failures}) f JOIN verdicts v ON v.id = f.id "
                          "GROUP BY f.run_id, v.filter"):
        drops.setdefault(row["run_id"], {})[row["filter"]] = row["n"]
    for run in runs:
        run["dropped"] = drops.get(run["id"], {})
    return runs
