"""The rubric judge: a model scores each output on named criteria, under a grammar, and the scores are verdicts.

A recipe or a task spec names it in a `[judge]` table:

    [judge]
    model = "smollm2-135m-instruct"       # optional: default the run's model; another one is loaded after the main stage
    scale = [1, 5]                        # the lowest and highest score (default 1-5)
    threshold = 3.0                       # examples whose mean score is below it are dropped (default: the scale's middle)
    prompt = "../prompts/judge.md"        # optional prompt file (variables below); a built-in one otherwise

    [[judge.criteria]]
    name = "accuracy"
    description = "Is every statement in the response correct?"

The judge answers one JSON object: an integer in the scale per criterion, then a one-line `reason`
(`grammar`). It runs as a generation stage after the run's main one, at item indices JUDGE_BASE + x (x:
the judged generation's index, `appliance.runs.items`), greedy unless `[judge.sampling]` says otherwise;
a resumed run judges only what is missing. Every judge prompt starts with the same rubric and ends with
the text judged, so the engine decodes the rubric once and shares it across the batch.

Each score becomes a verdict: filter `judge`, score = the mean over the criteria, passed = mean >=
threshold, reason = each criterion's score and the model's reason, detail_json = {criterion: score}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.filters import Verdict
from ..engine.grammar import Grammar
from ..engine.types import SamplingParams
from ..errors import ApplianceError
from ..models.registry import ModelRecord
from ..prompts.files import PromptFile, load_prompt, parse_prompt
from .files import Sampling
from .items import JUDGE_BASE, Execution, Item, item_seeds, pending
from .style import PromptStyle, style_for

if TYPE_CHECKING:
    from ..models.registry import Registry
    from .session import RunSession

PROMPT_VARIABLES = ("criteria", "low", "high", "instruction", "input", "response")

DEFAULT_PROMPT = """+++
name = "rubric-judge"
description = "Scores a response on the rubric's criteria, after two worked examples (the judge's default prompt)."
+++
You grade responses to instructions. Score each criterion from {{ low }} (very poor) to {{ high }} (excellent):
{% for c in criteria %}- {{ c.name }}: {{ c.description }}
{% endfor %}Reply with one JSON object: an integer score for each criterion, then "reason": one short sentence.
### user
Instruction: Explain why the sky is blue.
Response: Bananas are yellow and trains are fast, so the sky is green.
### assistant
{{ "{" }}{% for c in criteria %}"{{ c.name }}": {{ low }}, {% endfor %}"reason": "It does not answer the instruction and what it says is false."}
### user
Instruction: Explain why the sky is blue.
Response: Sunlight is made of many colours. Air scatters blue light much more than red, so blue light reaches our eyes from all over the sky.
### assistant
{{ "{" }}{% for c in criteria %}"{{ c.name }}": {{ high }}, {% endfor %}"reason": "A correct, clear and short answer."}
### user
Instruction: {{ instruction }}
{% if input %}Input: {{ input }}
{% endif %}Response: {{ response }}
"""


class JudgeError(ApplianceError):
    """A judge that cannot be set up as the run file asks."""


class Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,39}$", description="a JSON key: letters, digits, _")
    description: str = Field(min_length=1, description="one line the judge reads: what a high score means")

    @field_validator("name")
    @classmethod
    def _not_reason(cls, value: str) -> str:
        if value == "reason":
            raise ValueError("'reason' is the judge's own key; name the criterion otherwise")
        return value

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value.strip() or "\n" in value.strip():
            raise ValueError("a criterion's description is one line of text")
        return value.strip()


class JudgeConfig(BaseModel):
    """The `[judge]` table of a recipe or task spec."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="a registered name or a .gguf path; default the run's model")
    criteria: list[Criterion] = Field(min_length=1)
    scale: list[int] = Field(default_factory=lambda: [1, 5], description="[lowest, highest] score")
    threshold: float | None = Field(None, description="the mean score an example needs to be kept (default: the scale's middle)")
    prompt: str | None = Field(None, description="prompt file (uses response; may use " + ", ".join(PROMPT_VARIABLES) + ")")
    reason_max_chars: int = Field(160, ge=16, le=1000, description="the longest one-line reason the judge may write")
    sampling: Sampling = Field(default_factory=Sampling, description="default greedy (temperature 0)")

    @model_validator(mode="after")
    def _consistent(self) -> JudgeConfig:
        if len(self.scale) != 2 or self.scale[0] >= self.scale[1]:
            raise ValueError(f"scale is [lowest, highest] with lowest < highest, not {self.scale}")
        if self.scale[1] - self.scale[0] > 100:
            raise ValueError("a scale spans at most 100 points")
        names = [c.name for c in self.criteria]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"criteria named twice: {', '.join(twice)}")
        if self.threshold is not None and not self.low <= self.threshold <= self.high:
            raise ValueError(f"threshold {self.threshold} is outside the scale {self.low}-{self.high}")
        return self

    @property
    def low(self) -> int:
        return self.scale[0]

    @property
    def high(self) -> int:
        return self.scale[1]

    @property
    def cutoff(self) -> float:
        """The mean score an example needs: the threshold, else the middle of the scale."""
        return self.threshold if self.threshold is not None else (self.low + self.high) / 2


@dataclass
class Rubric:
    """A judge ready to run: its settings, prompt file, model and how the model is prompted."""

    config: JudgeConfig
    prompt: PromptFile
    record: ModelRecord
    style: PromptStyle

    @property
    def schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {c.name: {"type": "integer", "minimum": self.config.low, "maximum": self.config.high}
                                 for c in self.config.criteria}
        props["reason"] = {"type": "string", "maxLength": self.config.reason_max_chars, "pattern": "^[^\\n]*$"}
        return {"type": "object", "properties": props, "required": list(props)}

    def grammar(self) -> Grammar:
        return Grammar.from_json_schema(self.schema, prefix="" if self.style.chat else "\n\n")

    def params(self) -> SamplingParams:
        """Greedy unless `[judge.sampling]` says otherwise; room for every score and the longest reason."""
        s = self.config.sampling
        longest = sum(len(c.name) + 8 for c in self.config.criteria) + self.config.reason_max_chars + 24
        values = {"temperature": 0.0, "max_tokens": longest} | s.model_dump(exclude_none=True, exclude={"stop"})
        return SamplingParams(**values, stop=s.stop or [])


@dataclass
class Judged:
    """One output to score: its generation (id and item index) and the text the judge reads."""

    generation_id: int
    index: int
    instruction: str
    response: str
    input: str = ""


def load_rubric(config: JudgeConfig, resolve: Callable[[str], Path], registry: Registry, run_record: ModelRecord, *,
                where: str, chat_template: str | None = None) -> Rubric:
    """The judge of a run file (`where` names it in errors), checked before anything is loaded: its prompt
    file and model. The run's own model keeps the run's `chat_template`."""
    if config.prompt:
        prompt = load_prompt(resolve(config.prompt))
    else:
        prompt = parse_prompt(DEFAULT_PROMPT, name="rubric-judge")
    name = prompt.path or prompt.name
    if "response" not in prompt.variables:
        raise JudgeError(f"judge prompt {name} must use {{{{ response }}}} (the text it scores)")
    other = [v for v in prompt.variables if v not in PROMPT_VARIABLES and v not in prompt.header.vars]
    if other:
        raise JudgeError(f"judge prompt {name} uses {', '.join(repr(v) for v in other)}, which the judge does not give "
                         f"(it gives: {', '.join(PROMPT_VARIABLES)})")
    record = registry.resolve(config.model) if config.model else run_record
    same = record.path == run_record.path
    # the built-in prompt is written as turns for both modes: chat when the model has a template, else completion text
    style = style_for(record, prompt=prompt if config.prompt else None, chat_template=chat_template if same else None, fewshot=False)
    rubric = Rubric(config, prompt, record, style)
    try:
        rubric.grammar()
    except ApplianceError as exc:
        raise JudgeError(f"{where}: [judge]: {exc}") from None
    return rubric


def judge_items(rubric: Rubric, judged: list[Judged], base_seed: int) -> list[Item]:
    """One item per output to score, at JUDGE_BASE + its generation's item index: the rubric first, the text last."""
    grammar, params = rubric.grammar(), rubric.params()
    criteria = [{"name": c.name, "description": c.description} for c in rubric.config.criteria]
    items = []
    for j in judged:
        index = JUDGE_BASE + j.index
        values = {**rubric.prompt.header.vars, "criteria": criteria, "low": rubric.config.low, "high": rubric.config.high,
                  "instruction": " ".join(j.instruction.split()), "input": j.input.strip(), "response": j.response.strip()}
        item = rubric.style.item(rubric.prompt, values, index=index, seed=item_seeds(base_seed, 1, start=index)[0],
                                 grammar=grammar, params=params)
        item.variables = {"check": "judge", "generation_id": j.generation_id, "of_item": j.index}
        items.append(item)
    return items


def estimated_workload(rubric: Rubric, count: int, response_tokens: int) -> tuple[list[str], SamplingParams]:
    """Judge prompts around stand-in outputs of about `response_tokens` tokens each, to plan the judge stage
    before the outputs exist (so the judge needs no reload of a model planned for shorter prompts)."""
    stand_in = " ".join(["word"] * response_tokens)
    judged = [Judged(0, i, f"instruction {i}", f"{i} {stand_in}") for i in range(max(count, 1))]
    return [it.prompt for it in judge_items(rubric, judged, 0)], rubric.params()


def judge_workload(rubric: Rubric | None, record: ModelRecord, n_items: int, params: SamplingParams) -> list[tuple[list[str], SamplingParams]]:
    """What the judge will ask the run's own model (planned with the main stage, so judging needs no reload):
    its prompts around outputs of the longest length allowed; nothing for a judge on another model."""
    if rubric is None or rubric.record.path != record.path:
        return []
    return [estimated_workload(rubric, min(n_items, 64), params.max_tokens)]


def run_judge(session: RunSession, rubric: Rubric, judged: list[Judged], base_seed: int) -> Execution | None:
    """Score every output the run has not scored yet, on the judge's model (loaded in place of the run's
    model when it is another one)."""
    items = judge_items(rubric, judged, base_seed)
    todo = pending(session.store, session.run_id, items)
    if not todo:
        return None
    params = rubric.params()
    if rubric.record.path != session.record.path:
        session.use_model(rubric.record, [([it.prompt for it in todo], params)])
    session.event("info", f"judge: scoring {len(todo)} output{'s' if len(todo) != 1 else ''} with {rubric.record.name} "
                          f"on {', '.join(c.name for c in rubric.config.criteria)}")
    p = rubric.prompt
    prompt_id = session.store.save_prompt(p.name, p.text, p.sha256, p.path)
    return session.generate(todo, params, prompt_id=prompt_id)


def verdict(config: JudgeConfig, output: str, finish_reason: str | None = None) -> Verdict:
    """The `judge` verdict of one judge output: the mean score against the threshold, each score and the reason."""
    try:
        data = json.loads(output)
    except json.JSONDecodeError:
        data = None
    scores = {c.name: data.get(c.name) if isinstance(data, dict) else None for c in config.criteria}
    bad = [n for n, s in scores.items() if not isinstance(s, int) or isinstance(s, bool) or not config.low <= s <= config.high]
    if bad:
        cut = " (cut off at max_tokens)" if finish_reason == "length" else ""
        shown = " ".join(output.split())[:80]
        return Verdict(filter="judge", passed=False, reason=f"the judge gave no score for {', '.join(bad)}{cut}: {shown!r}")
    mean = sum(scores.values()) / len(scores)
    said = " ".join(str(data.get("reason") or "").split())
    parts = ", ".join(f"{n} {s}" for n, s in scores.items())
    rel = ">=" if mean >= config.cutoff else "<"
    return Verdict(filter="judge", passed=mean >= config.cutoff, score=round(mean, 4),
                   reason=f"{parts} (mean {mean:.2f} {rel} {config.cutoff:g})" + (f": {said}" if said else ""), detail=scores)


def judge_verdicts(config: JudgeConfig, gens: list[dict[str, Any]]) -> dict[int, Verdict]:
    """judged generation id -> its `judge` verdict, from a run's judge generations (item_index >= JUDGE_BASE;
    rows with output, finish_reason, variables_json)."""
    out: dict[int, Verdict] = {}
    for g in gens:
        if g["item_index"] < JUDGE_BASE:
            continue
        v = json.loads(g["variables_json"] or "{}")
        if v.get("check") == "judge":
            out[v["generation_id"]] = verdict(config, g["output"], g.get("finish_reason"))
    return out
