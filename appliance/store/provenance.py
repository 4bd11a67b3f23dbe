"""The provenance fields a run row records when it starts (migration 5): the appliance and llama.cpp
versions, and the model file and prompt behind the run."""

from __future__ import annotations

import sqlite3
from functools import lru_cache
from typing import Any

from ..version import VERSION


@lru_cache(maxsize=1)
def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python (which pins the llama.cpp it builds), read without loading it."""
    import importlib.metadata  # here: 12 ms, which only a new run row needs

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_fields(conn: sqlite3.Connection, model_id: int | None, prompt_id: int | None) -> dict[str, Any]:
    """The provenance columns of a new run row (migration 5)."""
    fields: dict[str, Any] = {"appliance_version": VERSION, "llama_cpp_version": llama_cpp_version()}
    if model_id is not None:
        row = conn.execute("SELECT path, file_type, n_params FROM models WHERE id = ?", [model_id]).fetchone()
        if row:
            fields.update(model_file=row[0].replace("\\", "/").rsplit("/", 1)[-1], model_quant=row[1], model_params=row[2])
    if prompt_id is not None:
        row = conn.execute("SELECT sha256 FROM prompts WHERE id = ?", [prompt_id]).fetchone()
        if row:
            fields["prompt_sha256"] = row[0]
    return fields
