"""Items: what a run asks the model for, one rendered prompt with its own seed, and the row each becomes.

An item's index and seed are fixed by its run's recipe, so a resumed run finds the items it has not
stored yet (`pending`) and stores each one once (`item_key`). `appliance.runs.session.RunSession`
generates them.

Item indices of a recipe run (synthetic, annotated, augmented):

    0 .. ITEM_LIMIT-1                  the recipe's items (attempt 0)
    a * ITEM_LIMIT + i                 attempt a (1..RETRY_BUDGET) of item i, made only when attempt a-1
                                       came out empty (`appliance.recipes.retry`)
    FIDELITY_BASE + k * ITEM_LIMIT + i the fidelity check of axis k of item i's final output
                                       (`appliance.recipes.fidelity`)
    (2t + s) * ITEM_LIMIT + i          conversation: turn t (< MAX_TURNS) of conversation i, the user's
                                       message (s = 0) or the assistant's answer (s = 1); conversation
                                       runs have no retries or fidelity checks
    r * ITEM_LIMIT + i                 preference: response r (< MAX_RESPONSES) to instruction i
    ANSWER_BASE + i                    magpie: the answer to item i's self-written request
    JUDGE_BASE + x                     the rubric judge's scoring of the generation at index x

Task runs lay out their rounds and phases in `appliance.tasks.run`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from ..store import Store, to_json, utcnow

if TYPE_CHECKING:  # annotations only: the engine's types import pydantic, which `export` (reading a summary) does not need
    from ..engine.types import Completion, SamplingParams

RecipeKind = Literal["synthetic", "annotated", "augmented", "conversation", "preference"]
RECIPE_KINDS: tuple[str, ...] = get_args(RecipeKind)  # run kinds made from a recipe file (the others: generate, task, eval)
ITEM_LIMIT = 10_000_000  # a recipe's items per run, and the stride of its retries and checks
RETRY_BUDGET = 2  # times an empty output is generated again
FIDELITY_BASE = (RETRY_BUDGET + 1) * ITEM_LIMIT
MAX_TURNS = 16  # exchanges in one conversation
MAX_RESPONSES = 16  # responses to one instruction in a preference run
ANSWER_BASE = 100 * ITEM_LIMIT
JUDGE_BASE = 1000 * ITEM_LIMIT


@dataclass
class Item:
    index: int
    seed: int
    prompt: str
    variables: dict[str, Any] = field(default_factory=dict)
    chunk_id: int | None = None
    grammar: Any = None  # constrains this item's output (else the run's grammar)
    params: SamplingParams | None = None  # this item's sampling settings (else the stage's)
    messages: list[dict[str, str]] | None = None  # chat mode: the messages `prompt` was rendered from
    add_bos: bool = True  # False when the rendered chat prompt already starts with the BOS text


@dataclass
class Execution:
    rows: int
    tokens_out: int
    seconds: float
    write_seconds: float
    retries: list[str]


def item_seeds(base: int, count: int, start: int = 0) -> list[int]:
    """Each item's own seed, derived from the run's base seed (so the same base seed reproduces the run)."""
    return [
        int.from_bytes(hashlib.sha256(f"{base}:{i}".encode()).digest()[:4], "little") & 0x7FFFFFFF
        for i in range(start, start + count)
    ]


def item_key(run_id: int, index: int, seed: int) -> str:
    return hashlib.sha256(f"{run_id}:{index}:{seed}".encode()).hexdigest()[:32]


def pending(store: Store, run_id: int | None, items: list[Item]) -> list[Item]:
    """The items a run has not stored yet (all of them for a run not started), in one query."""
    if run_id is None:
        return list(items)
    done = {r["item_index"] for r in store.rows("SELECT item_index FROM generations WHERE run_id = ?", [run_id])}
    return [it for it in items if it.index not in done]


def merge(executions: Iterable[Execution | None]) -> Execution | None:
    """Several executions of one run (e.g. its rounds) added up; None (a stage with nothing to do) counts nothing."""
    executions = [e for e in executions if e is not None]
    if not executions:
        return None
    return Execution(
        rows=sum(e.rows for e in executions),
        tokens_out=sum(e.tokens_out for e in executions),
        seconds=sum(e.seconds for e in executions),
        write_seconds=sum(e.write_seconds for e in executions),
        retries=[r for e in executions for r in e.retries],
    )


def row_for(run_id: int, prompt_id: int | None, item: Item, done: Completion) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "item_key": item_key(run_id, item.index, item.seed),
        "item_index": item.index,
        "prompt_id": prompt_id,
        "rendered_prompt": item.prompt,
        "output": done.text,
        "seed": done.seed,
        "tokens_in": done.tokens_in,
        "tokens_out": done.tokens_out,
        "ms": done.ms,
        "finish_reason": done.finish_reason,
        "parallel": done.parallel,
        "chunk_id": item.chunk_id,
        "variables_json": to_json(item.variables) if item.variables else None,
        "messages_json": to_json(item.messages) if item.messages is not None else None,
        "created_at": utcnow(),
    }
