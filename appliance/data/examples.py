"""Examples: the dataset rows that survive the filters, and the fine-tuning file formats they are written in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..errors import ApplianceError

FORMATS = ("openai", "sharegpt", "alpaca", "jsonl", "dpo", "openai-preference")
PREFERENCE_FORMATS = ("dpo", "openai-preference")  # need a preference run's examples (chosen and rejected)


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
    messages: list[dict[str, str]] | None = Field(
        default=None, description="a conversation's turns, user and assistant alternating, ending with the assistant's "
        "(no system message: that is `system`); `instruction` is then the first user turn and `output` the last answer",
    )
    rejected: str | None = Field(default=None, description="a preference pair's worse response (`output` is the chosen one)")
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn: the instruction, then the input after a blank line when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    @property
    def turns(self) -> list[dict[str, str]]:
        """Every user and assistant message, in order (one exchange for a single-turn example)."""
        if self.messages:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.output}]

    def chat(self) -> list[dict[str, str]]:
        """The whole conversation in OpenAI's roles, the system message first when there is one."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.turns


SPEAKERS = {"user": "User", "assistant": "Assistant"}  # a conversation's turns as transcript lines


def transcript(messages: list[dict[str, str]]) -> str:
    """User and assistant messages as one "User: ..." / "Assistant: ..." line each."""
    return "\n".join(f"{SPEAKERS[m['role']]}: {m['content']}" for m in messages)


_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def to_record(example: Example, fmt: str) -> dict[str, Any]:
    """One line of the dataset file in `fmt` (one of FORMATS); `jsonl` keeps every field of the example."""
    if fmt == "openai":
        return {"messages": example.chat()}
    if fmt == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in example.chat()]}
    if fmt == "alpaca":
        return _alpaca(example)
    if fmt in PREFERENCE_FORMATS:
        if example.rejected is None:
            raise ExportError(f"format {fmt} needs preference pairs (chosen and rejected), which example {example.id} "
                              "has not: export a preference recipe's run")
        context = example.chat()[:-1]  # the system message and the user's request; the answers are the pair
        chosen = [{"role": "assistant", "content": example.output}]
        rejected = [{"role": "assistant", "content": example.rejected}]
        if fmt == "dpo":  # TRL's conversational preference format (DPOTrainer)
            return {"prompt": context, "chosen": chosen, "rejected": rejected}
        return {"input": {"messages": context}, "preferred_output": chosen, "non_preferred_output": rejected}
    check_format(fmt)
    return example.model_dump()


def _alpaca(example: Example) -> dict[str, Any]:
    """Alpaca's fields; a conversation's earlier exchanges go in `history` ([user, assistant] pairs, as
    LLaMA-Factory reads them) and its last one in instruction/output."""
    record: dict[str, Any] = {"instruction": example.instruction, "input": example.input, "output": example.output}
    if example.messages and len(example.messages) > 2:
        turns = example.messages
        record = {"instruction": turns[-2]["content"], "input": "", "output": turns[-1]["content"],
                  "history": [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]}
    return record | ({"system": example.system} if example.system is not None else {})


def write_jsonl(path: str | Path, examples: Iterable[Example], fmt: str) -> int:
    """Write one JSON record per line (UTF-8, to a temporary file renamed at the end); returns the count."""
    check_format(fmt)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), made once, not per line
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(encode(to_record(example, fmt)) + "\n")
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
    examples with the same output look alike. A conversation is compared by all of its turns.
    """
    if example.messages:
        return "\n".join(m["content"] for m in example.messages)
    return f"{example.input if example.input.strip() else example.instruction}\n{example.output}"
