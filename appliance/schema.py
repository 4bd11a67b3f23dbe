"""JSON schemas for constrained output: read, check, and turn into a llama.cpp grammar (GBNF)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ApplianceError


def load_json_schema(path: str | Path) -> tuple[dict[str, Any], str]:
    """A JSON schema file and the llama.cpp grammar (GBNF) that constrains output to it."""
    p = Path(path)
    if not p.is_file():
        raise ApplianceError(f"no such JSON schema file: {p}" if not p.exists() else f"{p} is not a file")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApplianceError(f"invalid JSON schema {p}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ApplianceError(f"invalid JSON schema {p}: the top level must be an object")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exceptions/AssertionErrors on bad schemas
        raise ApplianceError(f"invalid JSON schema {p}: {exc or type(exc).__name__}") from None
    return schema, grammar
