"""Run files: what a recipe and a task spec share before either is validated: reading the TOML file
(one error line naming the file), the `[sampling]` table, and telling the two kinds of file apart."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ApplianceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Sampling(BaseModel):
    """A run file's sampling settings; None leaves the prompt file's or the engine's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    stop: list[str] | None = None


def is_task_spec(path: str | Path) -> bool:
    """Whether a TOML file is a task spec (it has `[[tasks]]`) rather than a recipe. A file that is not valid
    TOML is a task spec when a line opens `[[tasks]]`, so its syntax error is reported as a task spec's;
    False when unreadable (the recipe loader then reports the problem)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        return "tasks" in tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return re.search(r"^\s*\[\[\s*tasks\s*\]\]", text, re.M) is not None


def read_toml_file(path: str | Path, what: str, error: type[ApplianceError]) -> tuple[Path, str, dict[str, Any]]:
    """A TOML config file's path, text and data; each problem is one `error` line naming the file."""
    p = Path(path)
    if not p.exists():
        raise error(f"no such {what} file: {p}")
    if p.is_dir():
        raise error(f"{p} is a directory, not a {what} file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror}") from None
    try:
        return p, text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {p}: not valid TOML: {exc}") from None
