"""Running items through the model: the one path every command that generates takes.

An item is one rendered prompt with its own seed. `plan_items` sizes the context for the items
before anything is loaded; `execute` generates the items a run does not have yet (so a resumed run
skips what is done), writes each row from the writer thread the moment it completes, and marks the
run interrupted or failed, with the reason, when it stops early.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .engine import Completion, Engine, Request, SamplingParams, count_prompt_tokens
from .errors import RunInterrupted
from .hardware import detect_hardware
from .logs import interrupted_message
from .models import ModelRecord
from .planner import Plan, make_plan
from .store import Store, Writer, to_json, utcnow


@dataclass
class Item:
    index: int
    seed: int
    prompt: str
    variables: dict[str, Any] = field(default_factory=dict)
    chunk_id: int | None = None
    grammar: str | None = None  # constrains this item's output (else the run's grammar)


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


def plan_items(
    record: ModelRecord,
    prompts: list[str],
    params: SamplingParams,
    *,
    n_ctx: int | None = None,
    n_parallel: int | None = None,
    n_gpu_layers: int | None = None,
) -> tuple[Plan, int]:
    """The memory plan for generating these prompts (refused with PlanError before loading), and the
    number of prompt tokens they share."""
    prefix_tokens, suffix_tokens = count_prompt_tokens(record.path, prompts)
    plan = make_plan(
        record.info,
        detect_hardware(),
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        n_gpu_layers=n_gpu_layers,
        prefix_tokens=prefix_tokens,
        seq_tokens=suffix_tokens + params.max_tokens,
        max_parallel=len(prompts),
    )
    plan.require()
    return plan, prefix_tokens


def pending(store: Store, run_id: int | None, items: list[Item]) -> list[Item]:
    """The items a run has not stored yet (all of them for a run not started), in one query."""
    if run_id is None:
        return list(items)
    done = {r["item_index"] for r in store.rows("SELECT item_index FROM generations WHERE run_id = ?", [run_id])}
    return [it for it in items if it.index not in done]


def merge(executions: list[Execution]) -> Execution | None:
    """Several executions of one run (e.g. its rounds) added up."""
    if not executions:
        return None
    return Execution(
        rows=sum(e.rows for e in executions),
        tokens_out=sum(e.tokens_out for e in executions),
        seconds=sum(e.seconds for e in executions),
        write_seconds=sum(e.write_seconds for e in executions),
        retries=[r for e in executions for r in e.retries],
    )


def execute(
    store: Store,
    record: ModelRecord,
    plan: Plan,
    run_id: int,
    prompt_id: int | None,
    items: list[Item],
    params: SamplingParams,
    *,
    grammar: str | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> Execution:
    """Generate every item the run has not stored yet. Marks the run interrupted (Ctrl-C, SIGTERM) or
    failed (with the reason) when it stops early; rows already written stay."""
    todo = pending(store, run_id, items)
    by_index = {it.index: it for it in items}
    writer = Writer(store.path)
    start = time.perf_counter()
    tokens = 0
    retries: list[str] = []
    store.update("runs", run_id, {"status": "running", "ended_at": None, "error": None})
    try:
        if todo:
            with Engine(record.path, plan, grammar=grammar) as engine:
                requests = [Request(key=it.index, prompt=it.prompt, seed=it.seed, grammar=it.grammar) for it in todo]
                for done in engine.generate(requests, params, on_step=on_tokens):
                    row = _row(run_id, prompt_id, by_index[done.key], done)
                    writer.put(row)
                    tokens += done.tokens_out
                    if on_row:
                        on_row(row)
                retries = engine.stats.retries
        stats = writer.close()
    except KeyboardInterrupt:
        writer.close()
        store.finish_run(run_id, "interrupted", "stopped by a signal")  # `runs` shows how to continue it
        raise RunInterrupted(run_id, interrupted_message(store, run_id)) from None
    except BaseException as exc:
        try:
            writer.close()
        finally:
            store.finish_run(run_id, "failed", str(exc) or type(exc).__name__)
        raise
    for message in retries:
        store.event(run_id, "warning", message)
    return Execution(stats.rows, tokens, time.perf_counter() - start, stats.seconds, retries)


def _row(run_id: int, prompt_id: int | None, item: Item, done: Completion) -> dict[str, Any]:
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
        "created_at": utcnow(),
    }
