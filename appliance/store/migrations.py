"""Migrations: numbered functions, each applied once inside one transaction and recorded in `_migrations`.

Users query these tables with sqlite-utils and Datasette, so tables and columns are named for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the migrations get it from Store.db, which imports it only when one is pending
    import sqlite_utils


def _m001_core(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL UNIQUE,
            origin TEXT NOT NULL,              -- added | discovered | package
            sha256 TEXT,
            file_size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            architecture TEXT,
            file_type TEXT,
            n_params INTEGER,
            context_length INTEGER,
            block_count INTEGER,
            head_count INTEGER,
            head_count_kv INTEGER,
            key_length INTEGER,
            vocab_size INTEGER,
            info_json TEXT,                    -- everything read from the GGUF header
            added_at TEXT NOT NULL,
            removed_at TEXT                    -- `models remove` forgets a model but keeps its runs' history
        )"""
    )
    db.execute(
        """
        CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            source_path TEXT,
            sha256 TEXT NOT NULL UNIQUE,       -- content hash: an edited prompt is a new row
            text TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,                -- generate | synthetic | annotated | augmented | conversation | preference | task | eval
            status TEXT NOT NULL,              -- running | completed | interrupted | failed
            model_id INTEGER REFERENCES models(id),
            model_sha256 TEXT,
            prompt_id INTEGER REFERENCES prompts(id),
            requested INTEGER NOT NULL,        -- items asked for
            variables_json TEXT,
            params_json TEXT,                  -- sampling parameters
            plan_json TEXT,                    -- the memory plan the model was loaded with
            schema_json TEXT,
            config_json TEXT,                  -- recipe or command line that made the run
            error TEXT,
            started_at TEXT NOT NULL,
            ended_at TEXT
        )"""
    )
    db.execute(
        """
        CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            item_key TEXT NOT NULL UNIQUE,     -- hash of run, item and seed: writes are idempotent
            item_index INTEGER NOT NULL,
            prompt_id INTEGER REFERENCES prompts(id),
            rendered_prompt TEXT NOT NULL,
            output TEXT NOT NULL,
            seed INTEGER NOT NULL,
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            ms INTEGER NOT NULL,               -- wall time from first decode to last token
            finish_reason TEXT NOT NULL,       -- stop | length | eos | error
            parallel INTEGER,                  -- sequences decoded together when this one ran
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX generations_run ON generations(run_id, item_index)")
    db.execute("CREATE INDEX runs_status ON runs(status)")
    # Full-text search over outputs, kept in step by triggers (the layout sqlite-utils' enable_fts
    # makes, written out here because enable_fts commits and a migration must be one transaction).
    db.execute(
        "CREATE VIRTUAL TABLE generations_fts USING fts5(output, rendered_prompt, "
        "content=[generations], content_rowid=id, tokenize='porter')"
    )
    db.execute(
        """CREATE TRIGGER generations_ai AFTER INSERT ON generations BEGIN
            INSERT INTO generations_fts (rowid, output, rendered_prompt) VALUES (new.id, new.output, new.rendered_prompt);
        END"""
    )
    db.execute(
        """CREATE TRIGGER generations_ad AFTER DELETE ON generations BEGIN
            INSERT INTO generations_fts (generations_fts, rowid, output, rendered_prompt)
            VALUES ('delete', old.id, old.output, old.rendered_prompt);
        END"""
    )
    db.execute(
        """CREATE TRIGGER generations_au AFTER UPDATE ON generations BEGIN
            INSERT INTO generations_fts (generations_fts, rowid, output, rendered_prompt)
            VALUES ('delete', old.id, old.output, old.rendered_prompt);
            INSERT INTO generations_fts (rowid, output, rendered_prompt) VALUES (new.id, new.output, new.rendered_prompt);
        END"""
    )


def _m002_datasets(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE sources (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL,
            record INTEGER,                    -- line number for .jsonl sources
            title TEXT,
            sha256 TEXT NOT NULL,
            n_chars INTEGER NOT NULL,
            text TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (path, record, sha256)
        )"""
    )
    db.execute(
        """
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            source_id INTEGER NOT NULL REFERENCES sources(id),
            chunk_index INTEGER NOT NULL,
            max_tokens INTEGER NOT NULL,       -- the chunking setting that produced it
            start INTEGER NOT NULL,            -- character offsets into the source text
            "end" INTEGER NOT NULL,
            n_tokens INTEGER NOT NULL,
            text TEXT NOT NULL,
            UNIQUE (source_id, max_tokens, chunk_index)
        )"""
    )
    db.execute("ALTER TABLE generations ADD COLUMN chunk_id INTEGER REFERENCES chunks(id)")
    db.execute("ALTER TABLE generations ADD COLUMN variables_json TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN name TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN recipe_sha256 TEXT")
    db.execute(
        """
        CREATE TABLE verdicts (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            generation_id INTEGER NOT NULL REFERENCES generations(id),
            filter TEXT NOT NULL,
            passed INTEGER NOT NULL,
            score REAL,
            reason TEXT NOT NULL,
            UNIQUE (generation_id, filter)
        )"""
    )
    db.execute(
        """
        CREATE TABLE examples (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            generation_id INTEGER NOT NULL UNIQUE REFERENCES generations(id),
            chunk_id INTEGER REFERENCES chunks(id),
            instruction TEXT NOT NULL,
            input TEXT NOT NULL DEFAULT '',
            output TEXT NOT NULL,
            system TEXT,
            label TEXT,
            group_key TEXT,
            kept INTEGER NOT NULL,             -- 1 when every filter passed
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE run_events (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            level TEXT NOT NULL,               -- info | warning | error
            message TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX verdicts_run ON verdicts(run_id, filter, passed)")
    db.execute("CREATE INDEX examples_run ON examples(run_id, kept)")
    db.execute("CREATE INDEX runs_recipe ON runs(recipe_sha256)")


def _m003_tasks(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE examples ADD COLUMN task TEXT")
    db.execute("ALTER TABLE examples ADD COLUMN confidence REAL")  # self-consistency agreement of the label
    db.execute("ALTER TABLE examples ADD COLUMN split TEXT")       # assigned by task runs (train/validation/test)
    db.execute(
        """
        CREATE TABLE evals (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL UNIQUE REFERENCES runs(id),     -- the eval's own run (kind 'eval')
            dataset_run_id INTEGER NOT NULL REFERENCES runs(id),
            student_model_id INTEGER NOT NULL REFERENCES models(id),
            split TEXT NOT NULL,
            n INTEGER NOT NULL,
            metrics_json TEXT,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE predictions (
            id INTEGER PRIMARY KEY,
            eval_id INTEGER NOT NULL REFERENCES evals(id),
            example_id INTEGER NOT NULL REFERENCES examples(id),
            generation_id INTEGER REFERENCES generations(id),
            task TEXT NOT NULL,
            expected TEXT NOT NULL,
            predicted TEXT NOT NULL,
            correct INTEGER NOT NULL,
            valid INTEGER NOT NULL,
            UNIQUE (eval_id, example_id)
        )"""
    )


def _m004_chat(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE generations ADD COLUMN messages_json TEXT")    # chat mode: the messages before the template
    db.execute("ALTER TABLE runs ADD COLUMN mode TEXT")                    # chat | completion (how prompts reached the model)
    db.execute("ALTER TABLE runs ADD COLUMN chat_template_sha256 TEXT")    # the template chat prompts were rendered with
    db.execute("ALTER TABLE models ADD COLUMN chat_template_sha256 TEXT")  # the GGUF's own tokenizer.chat_template


def _m005_provenance(db: sqlite_utils.Database) -> None:
    # Numbered 5: 4 is taken by the chat-template migration being written beside this one.
    for column, kind in (("appliance_version", "TEXT"), ("llama_cpp_version", "TEXT"), ("model_file", "TEXT"),
                         ("model_quant", "TEXT"), ("model_params", "INTEGER"), ("prompt_sha256", "TEXT")):
        db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")


def _m006_newest_first(db: sqlite_utils.Database) -> None:
    # `logs --run RUN -n 20` reads a run's newest rows: ordered by (run_id, id), the index hands them over
    # in order, where (run_id, item_index) made SQLite sort every row of the run first (0.5 s at 100k rows).
    db.execute("CREATE INDEX generations_run_newest ON generations(run_id, id)")


def _m007_turns_and_pairs(db: sqlite_utils.Database) -> None:
    # Conversations and preference pairs (issue 23): an example is more than one instruction and one answer.
    db.execute("ALTER TABLE examples ADD COLUMN messages_json TEXT")  # multi-turn: every user/assistant turn, in order (no system)
    db.execute("ALTER TABLE examples ADD COLUMN rejected TEXT")       # preference: the worse response (`output` is the chosen one)
    db.execute("ALTER TABLE examples ADD COLUMN rejected_generation_id INTEGER REFERENCES generations(id)")
    db.execute("ALTER TABLE verdicts ADD COLUMN detail_json TEXT")    # the rubric judge: its score per criterion


def _m008_minhash(db: sqlite_utils.Database) -> None:
    # Each kept example's MinHash, computed once when it is written, so `export` reads 100k of them instead of
    # hashing every word 3-gram again (issue 22): 128 little-endian uint32 values (numpy dtype '<u4', 512 bytes)
    # of datasketch's MinHash(num_perm=128, seed=1) (affine32 permutations drawn by RandomState(1)) over the
    # word 3-shingles of the example's near-duplicate text (appliance.data.sketches); b'' for a text without
    # words; NULL when not computed (dropped examples, rows written before this migration): export computes it.
    db.execute("ALTER TABLE examples ADD COLUMN minhash BLOB")


def _m009_prompts_per_run(db: sqlite_utils.Database) -> None:
    # The prompts behind a run's generations (the dataset card's appendix): without an index SQLite read every
    # generation row of the run for its prompt_id (0.04 s of a 100k-item export); this one answers from the index.
    db.execute("CREATE INDEX generations_run_prompt ON generations(run_id, prompt_id)")


def _m010_chunks_per_tokenizer(db: sqlite_utils.Database) -> None:
    # Chunks are cut in a model's tokens but were looked up by (source, max_tokens) alone, so a recipe on another
    # model with the same max_tokens reused the first model's chunks, sized in the wrong tokens. The key gains
    # `tokenizer`: the sha256 of the model file whose vocabulary cut the chunk (NULL for chunks cut before this
    # migration; the first model whose own cut of the source matches them exactly adopts them). SQLite cannot
    # change a table's UNIQUE constraint in place, so the table is rebuilt with the same ids (generations and
    # examples refer to them): run with foreign keys off, then checked (REBUILDS; SQLite's documented procedure).
    db.execute(
        """
        CREATE TABLE chunks_new (
            id INTEGER PRIMARY KEY,
            source_id INTEGER NOT NULL REFERENCES sources(id),
            chunk_index INTEGER NOT NULL,
            max_tokens INTEGER NOT NULL,       -- the chunking setting that produced it
            start INTEGER NOT NULL,            -- character offsets into the source text
            "end" INTEGER NOT NULL,
            n_tokens INTEGER NOT NULL,
            text TEXT NOT NULL,
            tokenizer TEXT,                    -- sha256 of the model file that counted its tokens (NULL: cut before migration 10)
            UNIQUE (source_id, max_tokens, tokenizer, chunk_index)
        )"""
    )
    db.execute('INSERT INTO chunks_new (id, source_id, chunk_index, max_tokens, start, "end", n_tokens, text) '
               'SELECT id, source_id, chunk_index, max_tokens, start, "end", n_tokens, text FROM chunks')
    db.execute("DROP TABLE chunks")
    db.execute("ALTER TABLE chunks_new RENAME TO chunks")


# Migrations that rebuild a table other tables refer to, and that table: applied with foreign keys off (a DROP
# TABLE would otherwise delete the rows they refer to), then no row may refer to a missing row of it at commit.
REBUILDS = {10: "chunks"}

MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "core tables: models, prompts, runs, generations, FTS on outputs", _m001_core),
    (2, "datasets: sources, chunks, verdicts, examples, run events", _m002_datasets),
    (3, "task data and student evaluations: example task/split/confidence, evals, predictions", _m003_tasks),
    (4, "chat models: messages per generation, mode and template per run, template hash per model", _m004_chat),
    (5, "provenance per run: appliance and llama.cpp versions, model file, quantization, parameters, prompt hash", _m005_provenance),
    (6, "an index of each run's generations newest first (logs --run)", _m006_newest_first),
    (7, "conversations and preference pairs: example turns, rejected response, judge scores per criterion", _m007_turns_and_pairs),
    (8, "each kept example's MinHash, stored when it is written (export reads it)", _m008_minhash),
    (9, "an index of the prompts each run's generations used (the dataset card's appendix)", _m009_prompts_per_run),
    (10, "chunks keyed by the tokenizer (model file) that cut them, as well as source and max_tokens", _m010_chunks_per_tokenizer),
]
