"""JSON schemas for constrained output: read, check, and compile into an output constraint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from ..engine.grammar import Grammar, GrammarError


def load_json_schema(path: str | Path) -> tuple[dict[str, Any], Grammar]:
    """A JSON schema file and the Grammar that constrains output to it: one line of JSON, written as
    json.dumps writes it (", " and ": "), no properties beyond those the schema lists."""
    p = Path(path)
    if not p.is_file():
        raise ApplianceError(f"no such JSON schema file: {p}" if not p.exists() else f"{p} is not a file")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApplianceError(f"invalid JSON schema {p}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ApplianceError(f"invalid JSON schema {p}: the top level must be an object")
    try:
        grammar = Grammar.from_json_schema(schema)
    except GrammarError as exc:
        raise GrammarError(str(exc).replace("invalid JSON schema", f"invalid JSON schema {p}", 1)) from None
    return schema, grammar
