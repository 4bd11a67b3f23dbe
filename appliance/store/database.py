"""SQLite store: one file, opened with the settings every part uses, migrated on open (`migrations`), written
in short transactions; generation rows go through the writer thread (`writer`).

Everything the appliance makes is written here as soon as it exists. Users read the same file with
`sqlite-utils` or Datasette, so tables and columns are named for them.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .migrations import MIGRATIONS, REBUILDS
from .provenance import run_fields

if TYPE_CHECKING:
    import sqlite_utils

DEFAULT_DB_NAME = "appliance.db"
SQLITE_MAGIC = b"SQLite format 3\x00"


def default_db_path() -> Path:
    """`$APPLIANCE_DB`, else `./appliance.db` in the working folder."""
    return Path(os.environ.get("APPLIANCE_DB") or DEFAULT_DB_NAME)


def command_prefix(db: str | Path) -> str:
    """The `appliance` command as the user must type it to reach this database: `appliance --db PATH`,
    unless PATH is the one `appliance` opens by itself (./appliance.db, or $APPLIANCE_DB when set)."""
    path = Path(db)
    if path.resolve() == default_db_path().resolve():
        return "appliance"
    return f"appliance --db {shlex.quote(str(path))}"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)




# ---------------------------------------------------------------------------------------------


def _check_path(path: Path, readonly: bool) -> None:
    if path.is_dir():
        raise StoreError(f"database path {path} is a directory")
    if not path.exists():
        if readonly:
            raise StoreError(f"no database at {path} (a command that writes makes it, e.g. `{command_prefix(path)} generate PROMPT_FILE -m MODEL`)")
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
            if readonly:
                self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            else:
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(describe_sqlite_error(self.path, exc)) from None

    # -- schema ------------------------------------------------------------------------------
    @functools.cached_property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils' view of the connection, which migrations use; made on first use, since importing
        sqlite-utils imports pandas when that is installed (the test extra installs it): a quarter of a second for every command."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    def _migrate(self) -> None:
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in self.conn.execute("SELECT version FROM _migrations")}
        for version, name, apply in MIGRATIONS:
            if version in done:
                continue
            try:
                if version in REBUILDS:  # outside a transaction, where SQLite honours it
                    self.conn.execute("PRAGMA foreign_keys = OFF")
                self._apply(version, name, apply)
            finally:
                self.conn.execute("PRAGMA foreign_keys = ON")

    def _apply(self, version: int, name: str, apply: Callable[[sqlite_utils.Database], None]) -> None:
        """One migration in one transaction; a table rebuild (REBUILDS) may leave no row referring to a missing
        row of the rebuilt table that did not before (one broken by hand earlier is left as it was)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if self.conn.execute("SELECT 1 FROM _migrations WHERE version = ?", [version]).fetchone():
                self.conn.execute("ROLLBACK")  # another process applied it while we waited
                return
            rebuilt = REBUILDS.get(version)
            before = self._broken_references(rebuilt) if rebuilt else set()
            apply(self.db)
            if rebuilt and (broken := sorted(self._broken_references(rebuilt) - before)):
                raise sqlite3.IntegrityError(f"migration {version} left row {broken[0][1]} of {broken[0][0]} referring to a missing "
                                             f"{rebuilt} row")
            self.conn.execute("INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)", [version, name, utcnow()])
            self.conn.execute("COMMIT")
        except BaseException:
            rollback(self.conn)
            raise

    def _broken_references(self, table: str) -> set[tuple[Any, ...]]:
        """(table, rowid, parent, key) of each row whose foreign key names a missing row of `table`."""
        return {tuple(r) for r in self.conn.execute("PRAGMA foreign_key_check") if r[2] == table}

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
            raise StoreError(describe_sqlite_error(self.path, exc)) from None
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
            raise StoreError(describe_sqlite_error(target, exc)) from None
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
            raise StoreError(describe_sqlite_error(self.path, exc)) from None
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.DatabaseError as err:
                rollback(self.conn)
                raise StoreError(describe_sqlite_error(self.path, err)) from None
        rollback(self.conn)
        if isinstance(exc, sqlite3.DatabaseError):
            raise StoreError(describe_sqlite_error(self.path, exc)) from None


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: SQLite rolls back by itself on some errors (a full disk),
    and a second ROLLBACK would raise over the real problem."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def describe_sqlite_error(path: Path, exc: sqlite3.DatabaseError) -> str:
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
