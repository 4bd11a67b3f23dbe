"""A recipe run's items: its sources read into the store and cut into chunks, and one item per axis
combination (synthetic) or chunk (annotated, augmented), fully determined by the recipe."""

from __future__ import annotations

import functools
import itertools
import random
import sqlite3
from typing import Any

from ..engine.llama import Vocab
from ..prompts.files import PromptFile
from ..runs.items import Item, item_seeds
from ..runs.style import PromptStyle
from ..store import Store, insert_row, utcnow
from .recipe import FROM_AXES, LoadedRecipe
from .sources import chunk_text, read_sources

PASSAGE_VAR = "passage"


def axis_combinations(axes: dict[str, list[Any]], count: int, seed: int) -> list[dict[str, Any]]:
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


def ingest_chunks(store: Store, loaded: LoadedRecipe, vocab: Vocab, tokenizer: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Read the recipe's sources into the store and cut them into chunks (real model tokens). `tokenizer`
    names the vocabulary that counts them (the model file's sha256): chunks are reused only for the same
    source, max_tokens and tokenizer, so another model cuts its own. Returns the chunk rows in source order
    and the files skipped with their reasons."""
    recipe = loaded.recipe
    docs, skipped = read_sources([loaded.resolve(s) for s in recipe.sources], jsonl_field=recipe.jsonl_field)
    chunks: list[dict[str, Any]] = []
    columns = ("id", "chunk_index", "text", "start", "end", "n_tokens")
    for doc in docs:
        with store.transaction() as conn:
            row = conn.execute(
                "SELECT id FROM sources WHERE path = ? AND record IS ? AND sha256 = ?", [doc.path, doc.record, doc.sha256]
            ).fetchone()
            source_id = row[0] if row else insert_row(conn, "sources", {
                "path": doc.path, "record": doc.record, "title": doc.title, "sha256": doc.sha256,
                "n_chars": doc.n_chars, "text": doc.text, "created_at": utcnow(),
            })
            stored = functools.partial(_stored_chunks, conn, source_id, recipe.chunking.max_tokens)
            existing = stored(tokenizer)
            if existing:
                chunks += [dict(zip(columns, r), source_id=source_id) for r in existing]
                continue
            cut = [{"source_id": source_id, "chunk_index": c.index, "max_tokens": recipe.chunking.max_tokens, "start": c.start,
                    "end": c.end, "n_tokens": c.n_tokens, "text": c.text, "tokenizer": tokenizer}
                   for c in chunk_text(doc.text, recipe.chunking.max_tokens, recipe.chunking.min_tokens, vocab.count)]
            legacy = stored(None)  # cut before the key had a tokenizer (migration 10): adopted when they are this cut
            if legacy and [r[1:] for r in legacy] == [tuple(c[k] for k in columns[1:]) for c in cut]:
                conn.executemany("UPDATE chunks SET tokenizer = ? WHERE id = ?", [(tokenizer, r[0]) for r in legacy])
                chunks += [dict(zip(columns, r), source_id=source_id) for r in legacy]
                continue
            chunks += [{**c, "id": insert_row(conn, "chunks", c)} for c in cut]
    return chunks, skipped


def _stored_chunks(conn: sqlite3.Connection, source_id: int, max_tokens: int, tokenizer: str | None) -> list[tuple[Any, ...]]:
    return conn.execute('SELECT id, chunk_index, text, start, "end", n_tokens FROM chunks WHERE source_id = ? AND max_tokens = ? '
                        "AND tokenizer IS ? ORDER BY chunk_index", [source_id, max_tokens, tokenizer]).fetchall()


def build_items(loaded: LoadedRecipe, prompt: PromptFile, chunks: list[dict[str, Any]], style: PromptStyle) -> list[Item]:
    """The run's items, fully determined by the recipe (and its sources): the same recipe gives the same
    items, which is what lets a run resume."""
    recipe = loaded.recipe
    if recipe.kind in FROM_AXES:
        assignments = axis_combinations(recipe.axes, recipe.count or 0, recipe.seed)
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
