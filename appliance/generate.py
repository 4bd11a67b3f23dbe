"""`appliance generate`: render a prompt file COUNT times, plan, load, generate in batches, log every row.

Order of work, so that bad input costs nothing: prompt, variables and schema are checked and every
prompt is rendered first; then the plan is made (refused before loading when it does not fit);
only then is a run row written and the model loaded.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from .engine import SamplingParams
from .models import Registry
from .planner import Plan
from .prompts import PromptFile, VarValue, check_used
from .runner import Execution, Item, execute, item_seeds, plan_items
from .store import Store


class GenerateOptions(BaseModel):
    count: int = Field(gt=0)
    variables: dict[str, VarValue] = Field(default_factory=dict)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0)
    n_ctx: int | None = Field(None, gt=0)
    n_parallel: int | None = Field(None, gt=0)
    n_gpu_layers: int | None = Field(None, ge=-1)


def sampling_for(prompt: PromptFile, overrides: dict[str, Any]) -> SamplingParams:
    """Engine defaults, overridden by the prompt file's header, overridden by `overrides` (None = unset)."""
    header = prompt.header
    values: dict[str, Any] = {"stop": header.stop}
    for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens"):
        if getattr(header, key) is not None:
            values[key] = getattr(header, key)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**values)


@dataclass
class GenerateResult:
    run_id: int
    execution: Execution
    plan: Plan


def generate(
    store: Store,
    registry: Registry,
    prompt: PromptFile,
    model: str,
    opts: GenerateOptions,
    *,
    schema: tuple[dict[str, Any], str] | None = None,
    command: list[str] | None = None,
    on_plan: Callable[[Plan, int, int], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> GenerateResult:
    """Run one generate job to completion; every output is in the store when this returns."""
    check_used(prompt, opts.variables, "--var")
    base_seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    items = []
    for index, seed in enumerate(item_seeds(base_seed, opts.count)):
        values = prompt.values_for_item(opts.variables, seed)
        items.append(Item(index=index, seed=seed, prompt=prompt.render(values), variables=values))
    params = sampling_for(prompt, {"temperature": opts.temperature, "top_p": opts.top_p, "max_tokens": opts.max_tokens})

    record = registry.resolve(model)
    plan, prefix_tokens = plan_items(
        record, [it.prompt for it in items], params,
        n_ctx=opts.n_ctx, n_parallel=opts.n_parallel, n_gpu_layers=opts.n_gpu_layers,
    )
    if on_plan:
        on_plan(plan, prefix_tokens, len(items))

    prompt_id = store.save_prompt(prompt.name, prompt.text, prompt.sha256, prompt.path)
    run_id = store.start_run(
        kind="generate",
        model_id=record.id,
        model_sha256=registry.ensure_sha256(record),
        prompt_id=prompt_id,
        requested=opts.count,
        variables=opts.variables,
        params={**params.model_dump(), "seed": base_seed},
        plan=plan.model_dump(),
        schema=schema[0] if schema else None,
        config={"command": command, "options": opts.model_dump()},
    )
    execution = execute(
        store, record, plan, run_id, prompt_id, items, params,
        grammar=schema[1] if schema else None, on_row=on_row, on_tokens=on_tokens,
    )
    store.finish_run(run_id, "completed")
    return GenerateResult(run_id, execution, plan)
