"""The database: one SQLite file, numbered migrations, the writer thread, and the provenance fields a run row records.

May import: errors, version (nothing above it).
"""

from .database import Store, command_prefix, connect, default_db_path, insert_row, rollback, to_json, utcnow
from .writer import Writer, WriterStats

__all__ = ["Store", "Writer", "WriterStats", "command_prefix", "connect", "default_db_path", "insert_row", "rollback", "to_json", "utcnow"]
