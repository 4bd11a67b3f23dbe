"""Where a dataset came from: software versions and the model, prompt and recipe behind a run, written
into the run row when it starts and into every dataset card.
"""

from __future__ import annotations

import importlib.metadata
import json
import sqlite3
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..version import VERSION as __version__

if TYPE_CHECKING:
    from ..export import Example
    from ..store.database import Store


@lru_cache(maxsize=1)
def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python (which pins the llama.cpp it builds), read without loading it."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_fields(conn: sqlite3.Connection, model_id: int | None, prompt_id: int | None) -> dict[str, Any]:
    """The provenance columns of a new run row (migration 5)."""
    fields: dict[str, Any] = {"appliance_version": __version__, "llama_cpp_version": llama_cpp_version()}
    if model_id is not None:
        row = conn.execute("SELECT path, file_type, n_params FROM models WHERE id = ?", [model_id]).fetchone()
        if row:
            fields.update(model_file=row[0].replace("\\", "/").rsplit("/", 1)[-1], model_quant=row[1], model_params=row[2])
    if prompt_id is not None:
        row = conn.execute("SELECT sha256 FROM prompts WHERE id = ?", [prompt_id]).fetchone()
        if row:
            fields["prompt_sha256"] = row[0]
    return fields


def cross_split_duplicates(splits: dict[str, list["Example"]], threshold: float = 0.8) -> tuple[int, int]:
    """(examples with a near duplicate in another split, examples): measured on the text splits are
    de-duplicated on, MinHash Jaccard at `threshold`."""
    from ..export import dedup_text
    from .filters import NearDuplicateIndex

    index = NearDuplicateIndex(threshold=threshold)
    split_of: dict[str, str] = {}
    for name, part in splits.items():
        for ex in part:
            key = f"{name}\x00{ex.id}"
            split_of[key] = name
            index.insert(key, dedup_text(ex))
    crossing = 0
    for name, part in splits.items():
        for ex in part:
            crossing += any(split_of[m.key] != name for m in index.matches(dedup_text(ex)))
    return crossing, sum(len(p) for p in splits.values())


def card_lines(store: "Store", run_id: int) -> list[str]:
    """The card's provenance section: model, prompt and recipe hashes, sampling, versions, dates."""
    run = store.rows(
        "SELECT r.*, m.name AS model_name, m.sha256 AS model_file_sha256, p.name AS prompt_name, p.sha256 AS prompt_hash "
        "FROM runs r LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = r.prompt_id WHERE r.id = ?", [run_id])[0]
    params = json.loads(run["params_json"] or "{}")
    config = json.loads(run["config_json"] or "{}")
    source = config.get("recipe_path") or config.get("spec_path")
    lines = [
        f"- model: {run['model_name'] or '-'} (file `{run.get('model_file') or '-'}`, sha256 `{run['model_sha256'] or run['model_file_sha256'] or '-'}`)",
        f"- quantization: {run.get('model_quant') or '-'}; parameters: {run.get('model_params') or '-'}",
        f"- {'task spec' if run['kind'] == 'task' else 'recipe'}: `{source or '-'}`, sha256 `{run['recipe_sha256'] or '-'}`",
        f"- prompt: {run['prompt_name'] or ('built from the task spec' if run['kind'] == 'task' else '-')}"
        + (f", sha256 `{run['prompt_hash']}`" if run["prompt_hash"] else ""),
        f"- sampling: {_sampling(params)}",
        f"- appliance {run.get('appliance_version') or '-'}, llama-cpp-python {run.get('llama_cpp_version') or '-'}",
        f"- run {run_id} started {run['started_at']}, ended {run['ended_at'] or '-'}",
    ]
    return lines


def _sampling(params: dict[str, Any]) -> str:
    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    parts = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(flat.items())]
    parts += [f"{k}: " + ", ".join(f"{kk}={json.dumps(vv, ensure_ascii=False)}" for kk, vv in sorted(v.items())) for k, v in sorted(nested.items())]
    return "; ".join(parts) or "-"


def prompts_used(store: "Store", run_id: int) -> list[dict[str, Any]]:
    """The prompt files behind a run's generations (its own prompt first), for the card's appendix."""
    return store.rows(
        "SELECT p.name, p.sha256, p.source_path, p.text FROM prompts p WHERE p.id IN ("
        "SELECT prompt_id FROM runs WHERE id = ? UNION SELECT DISTINCT prompt_id FROM generations WHERE run_id = ?) "
        "ORDER BY p.id = (SELECT prompt_id FROM runs WHERE id = ?) DESC, p.id", [run_id, run_id, run_id])
