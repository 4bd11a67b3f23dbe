"""The GBNF grammar of a task's output, from plain data (a classify task's label names, an extract task's
JSON schema): the task kinds check at load time that llama.cpp can parse it, and the prompts hand it
to the engine. In completion mode the output follows "Output:", so the grammar starts with one space;
in chat mode it is the whole assistant turn."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..engine.grammar import gbnf_parses

__all__ = ["classify_gbnf", "extract_gbnf", "gbnf_parses"]


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def classify_gbnf(label_names: Sequence[str], chat: bool = False) -> str:
    """One of the labels."""
    lead = "" if chat else '" " '
    return f'root ::= {lead}({" | ".join(_gbnf_literal(name) for name in label_names)})\n'


def extract_gbnf(schema: dict[str, Any], chat: bool = False) -> str:
    """One JSON object under `schema`, as llama.cpp's converter writes it (raises what the converter raises
    for a schema it cannot take)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    lead = "" if chat else '" " '
    gbnf = json_schema_to_gbnf(json.dumps(schema))
    return re.sub(r"^root ::= (.*)$", lambda m: f"root ::= {lead}({m.group(1)})", gbnf, count=1, flags=re.M)
