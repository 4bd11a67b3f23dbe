import os
import sqlite3
import stat

import pytest
import sqlite_utils

from appliance.errors import StoreError
from appliance.store import Store, Writer
from appliance.store.migrations import MIGRATIONS


def test_new_database_is_migrated_private_and_in_wal(tmp_path):
    path = tmp_path / "a.db"
    store = Store(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite_utils.Database(path)
    assert {"models", "prompts", "runs", "generations", "generations_fts", "_migrations"} <= set(db.table_names())
    assert [r["version"] for r in db["_migrations"].rows] == [m[0] for m in MIGRATIONS]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    Store(path).close()  # opening again applies nothing twice
    assert db["_migrations"].count == len(MIGRATIONS)


def test_writer_is_idempotent_and_feeds_full_text_search(tmp_path):
    store = Store(tmp_path / "a.db")
    run_id = store.start_run(kind="generate", requested=2, params={"t": 1})
    row = {
        "run_id": run_id, "item_key": "k1", "item_index": 0, "prompt_id": None, "rendered_prompt": "p",
        "output": "the quick brown fox", "seed": 1, "tokens_in": 1, "tokens_out": 4, "ms": 5,
        "finish_reason": "length", "parallel": 1, "created_at": "now",
    }
    writer = Writer(store.path)
    writer.put(row)
    writer.put(dict(row))  # a resumed run writing the same item again
    writer.put({**row, "item_key": "k2", "item_index": 1, "output": "lazy dogs sleep"})
    stats = writer.close()
    db = sqlite_utils.Database(store.path)
    assert db["generations"].count == 2
    assert stats.rows == 2  # the row written twice is stored, and counted, once
    hits = db.execute("SELECT rowid FROM generations_fts WHERE generations_fts MATCH 'dog'").fetchall()
    assert len(hits) == 1  # porter stemming: "dog" finds "dogs"


def test_a_run_row_records_its_provenance(tmp_path):
    import importlib.metadata

    from appliance import __version__

    store = Store(tmp_path / "a.db")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO models (id, name, path, origin, sha256, file_size, mtime_ns, file_type, n_params, added_at) "
            "VALUES (1, 'm', '/models/tiny-Q4_K_M.gguf', 'added', 'abc', 10, 0, 'Q4_K_M', 270000000, 'now')")
    prompt_id = store.save_prompt("p", "Hello {{ x }}", "f00d", None)
    run_id = store.start_run(kind="generate", requested=1, model_id=1, prompt_id=prompt_id)
    run = store.rows("SELECT * FROM runs WHERE id = ?", [run_id])[0]
    assert (run["model_file"], run["model_quant"], run["model_params"], run["prompt_sha256"]) == (
        "tiny-Q4_K_M.gguf", "Q4_K_M", 270000000, "f00d")
    assert run["appliance_version"] == __version__
    assert run["llama_cpp_version"] == importlib.metadata.version("llama_cpp_python")


def test_writer_reports_errors_to_the_producer(tmp_path):
    store = Store(tmp_path / "a.db")
    writer = Writer(store.path)
    writer.put({"run_id": 999, "item_key": "x"})  # violates NOT NULL / foreign key
    with pytest.raises(StoreError):
        writer.close()


def test_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("my precious notes\n")
    with pytest.raises(StoreError, match="not a SQLite database"):
        Store(path)
    assert path.read_text() == "my precious notes\n"


def test_directory_and_missing_folder(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "nope" / "a.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_database_is_refused_for_writes(tmp_path):
    path = tmp_path / "a.db"
    Store(path).close()
    path.chmod(0o400)
    with pytest.raises(StoreError, match="read-only"):
        Store(path)


def test_read_only_database_is_refused_even_for_root(tmp_path, monkeypatch):
    """Root can write any file, so simulate a read-only file the way SQLite would see it."""
    path = tmp_path / "a.db"
    Store(path).close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) and mode == os.W_OK else real_access(p, mode))
    with pytest.raises(StoreError, match="read-only"):
        Store(path)


def test_backup_is_a_consistent_private_copy(tmp_path):
    store = Store(tmp_path / "a.db")
    store.start_run(kind="generate", requested=1)
    target = tmp_path / "backup.db"
    store.backup(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert sqlite_utils.Database(target)["runs"].count == 1
    with pytest.raises(StoreError, match="already exists"):
        store.backup(target)


def test_readonly_open_of_missing_database(tmp_path):
    with pytest.raises(StoreError, match="no database"):
        Store(tmp_path / "missing.db", readonly=True)


def test_truncated_sqlite_header_is_refused(tmp_path):
    path = tmp_path / "a.db"
    Store(path).close()
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(StoreError):
        Store(path)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(path).execute("SELECT * FROM runs").fetchall()


def test_migration_10_rebuilds_chunks_keeping_their_ids_and_references(tmp_path, monkeypatch):
    """Chunks made before migration 10 keep their ids (generations and examples refer to them) and get no
    tokenizer; afterwards another tokenizer's chunk of the same source, max_tokens and index can be stored,
    foreign keys are on again and nothing refers to a missing chunk."""
    from appliance.store import database
    from appliance.store.database import Store

    path = tmp_path / "old.db"
    monkeypatch.setattr(database, "MIGRATIONS", [m for m in MIGRATIONS if m[0] < 10])
    store = Store(path)
    conn = store.conn
    conn.execute("INSERT INTO runs (id, kind, status, requested, started_at) VALUES (1, 'annotated', 'completed', 2, 'now')")
    conn.execute("INSERT INTO sources (id, path, sha256, n_chars, text, created_at) VALUES (1, 's.txt', 'x', 9, 'some text', 'now')")
    for i, chunk_id in enumerate((7, 9)):
        conn.execute('INSERT INTO chunks (id, source_id, chunk_index, max_tokens, start, "end", n_tokens, text) '
                     "VALUES (?, 1, ?, 100, 0, 4, 1, 'some')", [chunk_id, i])
        conn.execute("INSERT INTO generations (id, run_id, item_key, item_index, rendered_prompt, output, seed, tokens_in, tokens_out, "
                     "ms, finish_reason, created_at, chunk_id) VALUES (?, 1, ?, ?, 'p', 'o', 1, 1, 1, 1, 'stop', 'now', ?)",
                     [chunk_id, f"k{i}", i, chunk_id])
    conn.execute("PRAGMA foreign_keys = OFF")  # a row broken by hand before the migration (the sqlite3 shell's default)
    conn.execute("INSERT INTO generations (id, run_id, item_key, item_index, rendered_prompt, output, seed, tokens_in, tokens_out, "
                 "ms, finish_reason, created_at, chunk_id) VALUES (11, 1, 'k2', 2, 'p', 'o', 1, 1, 1, 1, 'stop', 'now', 555)")
    store.close()
    monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS)
    store = Store(path)
    conn = store.conn
    assert conn.execute("SELECT max(version) FROM _migrations").fetchone()[0] == MIGRATIONS[-1][0]
    assert conn.execute("SELECT id, tokenizer FROM chunks ORDER BY id").fetchall() == [(7, None), (9, None)]
    assert conn.execute("SELECT g.id, c.id FROM generations g JOIN chunks c ON c.id = g.chunk_id ORDER BY g.id").fetchall() == [(7, 7), (9, 9)]
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert [tuple(r)[:3] for r in conn.execute("PRAGMA foreign_key_check")] == [("generations", 11, "chunks")]  # as it was, no new one
    conn.execute('INSERT INTO chunks (source_id, chunk_index, max_tokens, start, "end", n_tokens, text, tokenizer) '
                 "VALUES (1, 0, 100, 0, 4, 2, 'some', 'another model')")
    with pytest.raises(sqlite3.IntegrityError):  # the key holds for one tokenizer
        conn.execute('INSERT INTO chunks (source_id, chunk_index, max_tokens, start, "end", n_tokens, text, tokenizer) '
                     "VALUES (1, 0, 100, 0, 4, 2, 'some', 'another model')")
    with pytest.raises(sqlite3.IntegrityError):  # and foreign keys are enforced again
        conn.execute("DELETE FROM chunks WHERE id = 7")
