"""Examples: the dataset rows that survive the filters, and the fine-tuning file formats they are written in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..errors import ApplianceError

FORMATS = ("openai", "sharegpt", "alpaca", "jsonl")


class ExportError(ApplianceError):
    """An export that cannot be done as asked: unknown format, bad split spec, unwritable file."""


class Example(BaseModel):
    id: str
    instruction: str
    input: str = ""
    output: str
    system: str | None = None
    group: str | None = Field(
        default=None, description="lineage key (e.g. the source chunk): a group stays in one split"
    )
    label: str | None = Field(default=None, description="class label, for stratified splits and per-label counts")
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn: the instruction, then the input after a blank line when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def to_record(example: Example, fmt: str) -> dict[str, Any]:
    """One line of the dataset file in `fmt` (one of FORMATS); `jsonl` keeps every field of the example."""
    if fmt == "openai":
        system = [{"role": "system", "content": example.system}] if example.system is not None else []
        return {
            "messages": [
                *system,
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.output},
            ]
        }
    if fmt == "sharegpt":
        system = [{"from": "system", "value": example.system}] if example.system is not None else []
        return {
            "conversations": [
                *system,
                {"from": "human", "value": example.prompt},
                {"from": "gpt", "value": example.output},
            ]
        }
    if fmt == "alpaca":
        record = {"instruction": example.instruction, "input": example.input, "output": example.output}
        return record | ({"system": example.system} if example.system is not None else {})
    check_format(fmt)
    return example.model_dump()


def write_jsonl(path: str | Path, examples: Iterable[Example], fmt: str) -> int:
    """Write one JSON record per line (UTF-8, to a temporary file renamed at the end); returns the count."""
    check_format(fmt)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(to_record(example, fmt), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def dedup_text(example: Example) -> str:
    """The text compared for near duplicates: input + output when there is an input, else instruction + output.

    Task data often shares one long instruction across every example; comparing it would make all
    examples with the same output look alike.
    """
    return f"{example.input if example.input.strip() else example.instruction}\n{example.output}"
