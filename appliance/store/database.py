"""SQLite store: one file, numbered migrations, WAL, and a writer thread that keeps commits off the decode loop.

Everything the appliance makes is written here as soon as it exists. Users read the same file with
`sqlite-utils` or Datasette, so tables and columns are named for them.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import StoreError

DEFAULT_DB_NAME = "appliance.db"
SQLITE_MAGIC = b"SQLite format 3\x00"


def default_db_path() -> Path:
    """`$APPLIANCE_DB`, else `./appliance.db` in the working folder."""
    return Path(os.environ.get("APPLIANCE_DB") or DEFAULT_DB_NAME)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------------------------
# Migrations: numbered functions, each applied once inside one transaction and recorded.


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
            kind TEXT NOT NULL,                -- generate | synthetic | annotated | augmented | task | eval
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


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "core tables: models, prompts, runs, generations, FTS on outputs", _m001_core),
    (2, "datasets: sources, chunks, verdicts, examples, run events", _m002_datasets),
    (3, "task data and student evaluations: example task/split/confidence, evals, predictions", _m003_tasks),
    (4, "chat models: messages per generation, mode and template per run, template hash per model", _m004_chat),
    (5, "provenance per run: appliance and llama.cpp versions, model file, quantization, parameters, prompt hash", _m005_provenance),
]


# ---------------------------------------------------------------------------------------------


def _check_path(path: Path, readonly: bool) -> None:
    if path.is_dir():
        raise StoreError(f"database path {path} is a directory")
    if not path.exists():
        if readonly:
            raise StoreError(f"no database at {path} (run a command that writes, e.g. `appliance generate`)")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise StoreError(f"cannot create database {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot create database {path}: folder {parent} is not writable")
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise StoreError(f"cannot read database {path}: {exc.strerror}") from None
    if head and head != SQLITE_MAGIC:
        raise StoreError(f"{path} is not a SQLite database (refusing to touch it)")
    if not readonly:
        if not os.access(path, os.W_OK):
            raise StoreError(f"database {path} is read-only")
        parent = path.parent if str(path.parent) else Path(".")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"database {path} is in a read-only folder (SQLite needs to write its journal beside it)")


def _create_private(path: Path) -> None:
    """Create an empty database file readable by its owner only (0600)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
    os.close(fd)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the settings every part of the appliance uses."""
    if readonly:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class Store:
    """The appliance's database. Opening it validates the file and applies pending migrations."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.readonly = readonly
        _check_path(self.path, readonly)
        if not readonly:
            _create_private(self.path)
        try:
            self.conn = connect(self.path, readonly)
            self.db = sqlite_utils.Database(self.conn)
            if readonly:
                self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(_describe_sqlite_error(self.path, exc)) from None

    # -- schema ------------------------------------------------------------------------------
    def _migrate(self) -> None:
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in self.conn.execute("SELECT version FROM _migrations")}
        for version, name, apply in MIGRATIONS:
            if version in done:
                continue
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if self.conn.execute("SELECT 1 FROM _migrations WHERE version = ?", [version]).fetchone():
                    self.conn.execute("ROLLBACK")  # another process applied it while we waited
                    continue
                apply(self.db)
                self.conn.execute(
                    "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)", [version, name, utcnow()]
                )
                self.conn.execute("COMMIT")
            except BaseException:
                rollback(self.conn)
                raise

    def schema_version(self) -> int:
        row = self.conn.execute("SELECT max(version) FROM _migrations").fetchone()
        return row[0] or 0

    # -- small helpers -----------------------------------------------------------------------
    def transaction(self) -> "_Transaction":
        """`with store.transaction():` runs the block in BEGIN IMMEDIATE ... COMMIT."""
        return _Transaction(self.conn, self.path)

    def insert(self, table: str, row: dict[str, Any]) -> int:
        with self.transaction() as conn:
            return insert_row(conn, table, row)

    def update(self, table: str, pk: int, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{col} = ?" for col in values)
        with self.transaction() as conn:
            conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", [*values.values(), pk])

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        try:
            cur = self.conn.execute(sql, list(params))
        except sqlite3.DatabaseError as exc:
            raise StoreError(_describe_sqlite_error(self.path, exc)) from None
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # -- prompts -----------------------------------------------------------------------------
    def save_prompt(self, name: str, text: str, sha256: str, source_path: str | None) -> int:
        """The id of this exact prompt text, inserting it the first time it is used."""
        with self.transaction():
            row = self.conn.execute("SELECT id FROM prompts WHERE sha256 = ?", [sha256]).fetchone()
            if row:
                return row[0]
            row = {"name": name, "source_path": source_path, "sha256": sha256, "text": text, "created_at": utcnow()}
            return insert_row(self.conn, "prompts", row)

    # -- runs --------------------------------------------------------------------------------
    def start_run(self, **fields: Any) -> int:
        fields.setdefault("status", "running")
        fields.setdefault("started_at", utcnow())
        from ..data.card import run_fields

        fields = {**run_fields(self.conn, fields.get("model_id"), fields.get("prompt_id")), **fields}
        for key in ("variables", "params", "plan", "schema", "config"):
            if key in fields:
                value = fields.pop(key)
                fields[f"{key}_json"] = None if value is None else to_json(value)
        return self.insert("runs", fields)

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        self.update("runs", run_id, {"status": status, "error": error, "ended_at": utcnow()})

    def event(self, run_id: int, level: str, message: str) -> None:
        """Record something a run met on its way (a skipped file, a decode retry) for `runs` to show."""
        self.insert("run_events", {"run_id": run_id, "level": level, "message": message, "created_at": utcnow()})

    def backup(self, target: Path) -> None:
        if target.exists():
            raise StoreError(f"backup target {target} already exists")
        try:
            self.conn.execute("VACUUM INTO ?", [str(target)])
        except sqlite3.DatabaseError as exc:
            raise StoreError(_describe_sqlite_error(target, exc)) from None
        os.chmod(target, 0o600)

    def close(self) -> None:
        self.conn.close()


def insert_row(conn: sqlite3.Connection, table: str, row: dict[str, Any], on_conflict: str = "") -> int:
    """Plain INSERT inside the caller's transaction (sqlite-utils' insert commits on its own)."""
    cols = list(row)
    cur = conn.execute(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) {on_conflict}",
        [row[c] for c in cols],
    )
    return cur.lastrowid


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn, self.path = conn, path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise StoreError(_describe_sqlite_error(self.path, exc)) from None
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.DatabaseError as err:
                rollback(self.conn)
                raise StoreError(_describe_sqlite_error(self.path, err)) from None
        rollback(self.conn)
        if isinstance(exc, sqlite3.DatabaseError):
            raise StoreError(_describe_sqlite_error(self.path, exc)) from None


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: SQLite rolls back by itself on some errors (a full disk),
    and a second ROLLBACK would raise over the real problem."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _describe_sqlite_error(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "file is not a database" in text:
        return f"{path} is not a SQLite database"
    if "readonly" in text or "read-only" in text:
        return f"database {path} is read-only"
    if "disk is full" in text or "database or disk is full" in text:
        return f"cannot write database {path}: the disk is full (nothing was lost; free space and resume)"
    if "locked" in text:
        return f"database {path} stayed locked by another process for 30 s"
    return f"database {path}: {text}"


# ---------------------------------------------------------------------------------------------
# The writer: a thread fed by a queue, committing small batches, so the decode loop never waits on disk.


@dataclass
class WriterStats:
    rows: int = 0  # rows stored (an item already stored is not counted again)
    commits: int = 0
    seconds: float = 0.0


class Writer:
    """Writes generation rows from a background thread in short BEGIN IMMEDIATE transactions.

    A row whose unique `item_key` is already stored is skipped (ON CONFLICT DO NOTHING), so writing
    an item twice (a resumed run) is harmless; any other constraint still fails loudly. `close()` drains the queue; an error in the thread is re-raised by the
    next `put` or by `close`.
    """

    def __init__(self, path: Path, table: str = "generations", max_batch: int = 64) -> None:
        self.path, self.table, self.max_batch = path, table, max_batch
        self.stats = WriterStats()
        self.error: BaseException | None = None
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="appliance-writer", daemon=True)
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        self._raise_error()
        self._queue.put(row)

    def close(self) -> WriterStats:
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        return self.stats

    def _raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, sqlite3.DatabaseError):
                raise StoreError(_describe_sqlite_error(self.path, err)) from None
            raise err

    def _loop(self) -> None:
        conn = connect(self.path)
        done = False
        try:
            while not done:
                batch = [self._queue.get()]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is None:
                    done = True
                rows = [r for r in batch if r is not None]
                if rows and self.error is None:
                    self._write(conn, rows)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            written = 0
            for row in rows:
                cols = list(row)
                cur = conn.execute(f"INSERT INTO {self.table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                                   "ON CONFLICT(item_key) DO NOTHING", [row[c] for c in cols])
                written += cur.rowcount  # 0 for an item already stored
            conn.execute("COMMIT")
            self.stats.rows += written
            self.stats.commits += 1
        except BaseException as exc:  # handed to the producer thread
            rollback(conn)
            self.error = exc
        self.stats.seconds += time.perf_counter() - start
