"""`appliance generate`: render a prompt file COUNT times, plan, load, generate in batches, log every row.

Order of work, so that bad input costs nothing: prompt, variables and schema are checked and every
prompt is rendered first; then the plan is made (refused before loading when it does not fit);
only then is a run row written and the model loaded.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from ..models.registry import Registry
from ..plan.planner import Plan
from ..prompts.files import PromptFile, VarValue, check_used, sampling_for
from ..events import RunEvents
from .style import style_for
from .items import Execution, item_seeds
from .session import RunSession
from ..store import Store


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
    mode: str | None = Field(None, pattern="^(auto|chat|completion)$")  # None: the prompt file's
    chat_template: str | None = None  # a built-in template name or a file, for GGUFs without one


@dataclass
class GenerateResult:
    run_id: int
    execution: Execution
    plan: Plan
    mode: str = "completion"


def generate(
    store: Store,
    registry: Registry,
    prompt: PromptFile,
    model: str,
    opts: GenerateOptions,
    *,
    schema: tuple[dict[str, Any], Any] | None = None,
    command: list[str] | None = None,
    events: RunEvents | None = None,
) -> GenerateResult:
    """Run one generate job to completion; every output is in the store when this returns."""
    check_used(prompt, opts.variables, "--var")
    base_seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    record = registry.resolve(model)
    style = style_for(record, prompt=prompt, mode=opts.mode, chat_template=opts.chat_template)
    items = []
    for index, seed in enumerate(item_seeds(base_seed, opts.count)):
        values = prompt.values_for_item(opts.variables, seed)
        items.append(style.item(prompt, values, index=index, seed=seed))
    params = sampling_for(prompt, {"temperature": opts.temperature, "top_p": opts.top_p, "max_tokens": opts.max_tokens})

    with RunSession(store, record, events=events, n_parallel=opts.n_parallel, n_ctx=opts.n_ctx,
                    n_gpu_layers=opts.n_gpu_layers) as session:
        plan = session.prepare([([it.prompt for it in items], params)])
        prompt_id = store.save_prompt(prompt.name, prompt.text, prompt.sha256, prompt.path)
        run_id = session.begin(
            kind="generate",
            model_id=record.id,
            model_sha256=registry.ensure_sha256(record),
            prompt_id=prompt_id,
            requested=opts.count,
            variables=opts.variables,
            params={**params.model_dump(), "seed": base_seed},
            schema=schema[0] if schema else None,
            config={"command": command, "options": opts.model_dump()},
            **style.run_fields(),
        )
        execution = session.generate(items, params, prompt_id=prompt_id, grammar=schema[1] if schema else None)
        session.complete()
    return GenerateResult(run_id, execution, plan, style.mode)
