"""The writer: a thread fed by a queue, committing small batches, so the decode loop never waits on disk."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .database import connect, describe_sqlite_error, rollback


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
                raise StoreError(describe_sqlite_error(self.path, err)) from None
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
