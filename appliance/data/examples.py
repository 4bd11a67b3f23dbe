"""Examples: the dataset rows that survive the filters, and the fine-tuning file formats they are written in."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from operator import itemgetter
from pathlib import Path
from typing import Any

from ..errors import ApplianceError

FORMATS = ("openai", "sharegpt", "alpaca", "jsonl", "dpo", "openai-preference")
PREFERENCE_FORMATS = ("dpo", "openai-preference")  # need a preference run's examples (chosen and rejected)


class ExportError(ApplianceError):
    """An export that cannot be done as asked: unknown format, bad split spec, unwritable file."""


@dataclass(slots=True, kw_only=True)
class Example:
    """One kept dataset row. A plain slotted dataclass, not a validated model: an export makes one per kept
    example (100k at 100k items) from columns the store has already typed, and each costs a third as much.

    `group`: lineage key (e.g. the source chunk): a group stays in one split. `label`: class label, for
    stratified splits and per-label counts. `messages`: a conversation's turns, user and assistant alternating,
    ending with the assistant's (no system message: that is `system`); `instruction` is then the first user
    turn and `output` the last answer. `rejected`: a preference pair's worse response (`output` is the chosen
    one). `meta`: where the row came from (run, generation, chunk, seed), written by the `jsonl` format."""

    id: str
    instruction: str
    input: str = ""
    output: str
    system: str | None = None
    group: str | None = None
    label: str | None = None
    messages: list[dict[str, str]] | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in order (the `jsonl` format's record)."""
        return {name: getattr(self, name) for name in FIELDS}

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


FIELDS = tuple(f.name for f in fields(Example))


@dataclass(slots=True)
class ExampleColumns:
    """Examples as columns: one list per field of `Example`, aligned (row i of each is example i). What an
    export reads a run's kept rows into: the split, the card and the files read the columns they need, and
    no object is made per example (100k of them, and freeing them, were a fifth of an export at 100k items)."""

    id: list[str]
    instruction: list[str]
    input: list[str]
    output: list[str]
    system: list[str | None]
    group: list[str | None]
    label: list[str | None]
    messages: list[list[dict[str, str]] | None]
    rejected: list[str | None]
    meta: list[dict[str, Any]]

    @classmethod
    def of(cls, examples: Iterable[Example]) -> ExampleColumns:
        rows = list(examples)
        return cls(*([getattr(ex, name) for ex in rows] for name in FIELDS))

    def __len__(self) -> int:
        return len(self.id)

    def example(self, row: int) -> Example:
        return Example(**{name: getattr(self, name)[row] for name in FIELDS})

    def __iter__(self) -> Iterator[Example]:
        return map(self.example, range(len(self)))

    def take(self, rows: Sequence[int]) -> ExampleColumns:
        """These rows, in this order, as new columns."""
        if len(rows) < 2:  # itemgetter of one row gives that row, not a tuple of one
            return ExampleColumns(*([getattr(self, name)[i] for i in rows] for name in FIELDS))
        pick = itemgetter(*rows)
        return ExampleColumns(*(list(pick(getattr(self, name))) for name in FIELDS))


# ExampleColumns is made positionally in FIELDS order: its fields must be Example's, in Example's order.
assert tuple(f.name for f in fields(ExampleColumns)) == FIELDS, "ExampleColumns' fields are not Example's"


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
    return example.as_dict()


def _alpaca(example: Example) -> dict[str, Any]:
    """Alpaca's fields; a conversation's earlier exchanges go in `history` ([user, assistant] pairs, as
    LLaMA-Factory reads them) and its last one in instruction/output."""
    record: dict[str, Any] = {"instruction": example.instruction, "input": example.input, "output": example.output}
    if example.messages and len(example.messages) > 2:
        turns = example.messages
        record = {"instruction": turns[-2]["content"], "input": "", "output": turns[-1]["content"],
                  "history": [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]}
    return record | ({"system": example.system} if example.system is not None else {})


# A string as a JSON string literal: the function `json.JSONEncoder(ensure_ascii=False)` escapes strings with.
_quote = json.encoder.encode_basestring  # type: ignore[attr-defined]
_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), made once


def record_line(example: Example, fmt: str) -> str:
    """`to_record(example, fmt)` as one line of JSON (`json.dumps(..., ensure_ascii=False)`'s bytes exactly)."""
    return next(_lines([example], fmt))


def _single_turn_line(fmt: str) -> Callable[[str, str, str, str | None], str] | None:
    """For `openai`, `sharegpt` and `alpaca`: a single-turn example's line (`record_line`) from its instruction,
    input, output and system, written from the strings directly without the record's dicts (at 100k examples
    the dicts and their encoding were a third of an export); None for the other formats."""
    if fmt == "alpaca":
        def alpaca(instruction: str, extra: str, output: str, system: str | None) -> str:
            return (f'{{"instruction": {_quote(instruction)}, "input": {_quote(extra)}, "output": {_quote(output)}'
                    + ("}" if system is None else f', "system": {_quote(system)}}}'))
        return alpaca
    if fmt not in _CHAT_LINE:
        return None
    begin, system_key, user_key, assistant_key = _CHAT_LINE[fmt]

    def chat(instruction: str, extra: str, output: str, system: str | None) -> str:
        head = "" if system is None else f"{system_key}{_quote(system)}}}, "
        user = f"{instruction}\n\n{extra}" if extra else instruction  # Example.prompt
        return f"{begin}{head}{user_key}{_quote(user)}}}, {assistant_key}{_quote(output)}}}]}}"
    return chat


# A single-turn chat record's line, up to each string: its start, then the system, user and assistant messages'.
_CHAT_LINE = {
    "openai": ('{"messages": [', '{"role": "system", "content": ', '{"role": "user", "content": ', '{"role": "assistant", "content": '),
    "sharegpt": ('{"conversations": [', '{"from": "system", "value": ', '{"from": "human", "value": ', '{"from": "gpt", "value": '),
}
_BATCH_LINES = 4096  # lines joined into one write


def _lines(examples: Iterable[Example] | ExampleColumns, fmt: str) -> Iterator[str]:
    """Each example's `record_line`, the format's line maker chosen once."""
    check_format(fmt)
    single = _single_turn_line(fmt)
    if single is None:
        return (_encode(to_record(ex, fmt)) for ex in examples)
    if isinstance(examples, ExampleColumns) and not any(examples.messages):  # straight from the columns
        return map(single, examples.instruction, examples.input, examples.output, examples.system)
    return (_encode(to_record(ex, fmt)) if ex.messages else single(ex.instruction, ex.input, ex.output, ex.system) for ex in examples)


def write_jsonl(path: str | Path, examples: Iterable[Example] | ExampleColumns, fmt: str) -> int:
    """Write one JSON record per line (UTF-8, to a temporary file renamed at the end); returns the count."""
    check_format(fmt)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            batch: list[str] = []
            for line in _lines(examples, fmt):
                batch.append(line)
                if len(batch) == _BATCH_LINES:
                    f.write("\n".join(batch) + "\n")
                    count += len(batch)
                    batch.clear()
            if batch:
                f.write("\n".join(batch) + "\n")
                count += len(batch)
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
