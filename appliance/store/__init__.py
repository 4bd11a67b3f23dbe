"""The database: one SQLite file, numbered migrations, the writer thread, and the provenance fields a run row records.

May import: errors, version (nothing above it)."""
