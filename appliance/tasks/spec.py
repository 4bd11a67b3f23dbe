"""Task specs: one TOML file that mixes two or three narrow tasks for one small model.

    name = "smart-home"
    model = "gemma-3-270m-q4_k_m"         # the teacher: a registered name or a path to a .gguf
    count = 40                            # examples in all (or give `count` per task instead of `share`)
    seed = 1
    split = "train=0.7,validation=0.1,test=0.2"
    self_consistency = { samples = 3, min_agreement = 0.6 }
    balance = { tolerance = 0.2 }         # each label's count within +-20% of its target

    [[tasks]]
    name = "intent"
    kind = "classify"                     # classify | extract | transform
    share = 0.5                           # shares add up to 1; none at all means equal shares
    system = "Classify the request. Answer with one label."
    input_description = "Requests people say to a smart-home hub."   # heads the input-writing prompt
    input_name = "Request"
    edge_cases = ["a request that mentions two rooms"]
    hard_negatives = [["lights_on", "lights_off"]]
    [[tasks.labels]]
    name = "lights_on"
    description = "turn lights on or brighten them"
    examples = ["turn on the kitchen lights", "make it brighter in here"]
    [tasks.axes]                          # the prompt shows values without the axis name: make them
    tone = ["casual", "polite", "terse"]  # read on their own ("with typos", not "yes")

    [[tasks]]
    name = "slots"
    kind = "extract"                      # `schema`: a JSON schema of one object; outputs follow it
    schema = { type = "object", properties = { device = { type = "string" } }, required = ["device"] }
    examples = [{ input = "lights on", output = { device = "light" } }]   # or output = '{"device": null}' (JSON text)

    [[tasks]]
    kind = "transform"                    # `style`: one sentence on the output; examples with text outputs

Key paths in errors count from 0: `tasks[1].labels[2].name` is the third label of the second task.

The task kinds are in `appliance/tasks/kinds.py`; prompts and parsing in `appliance/tasks/prompts.py`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..data.examples import ExportError
from ..data.splits import parse_split_spec
from ..errors import ApplianceError, PromptError
from ..prompts.files import PromptFile, load_prompt
from ..runs.files import Sampling, read_toml_file
from ..runs.rubric import JudgeConfig
from .kinds import INPUT_PROMPT_VARIABLES, KINDS, MAX_COUNT, ClassifyTask, Problem, Strict, Task, check_line, shorten

class TaskSpecError(ApplianceError):
    """A task spec file that cannot be read or does not validate."""


class SelfConsistency(Strict):
    """Each output is sampled `samples` times; the majority wins, its share of the samples is the confidence."""

    samples: int = Field(3, ge=1, le=20, description="1 turns self-consistency off")
    min_agreement: float = Field(
        0.6, gt=0, le=1, description="items whose majority share is below this are flagged (2 of 3 is 0.667)"
    )


class Balance(Strict):
    tolerance: float = Field(0.2, ge=0, le=1, description="each label's count may miss its target by this share")

    def bounds(self, target: int) -> tuple[int, int]:
        """The counts a label with `target` examples may end with, rounded outward."""
        return math.floor(target * (1 - self.tolerance)), math.ceil(target * (1 + self.tolerance))


class TaskSampling(Strict):
    inputs: Sampling = Field(default_factory=Sampling, description="the teacher writing inputs")
    outputs: Sampling = Field(default_factory=Sampling, description="the teacher writing outputs (labels)")


class TaskSpec(Strict):
    name: str
    model: str = Field(description="the teacher: a registered model name or a path to a .gguf")
    count: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="examples in all; filled in from the tasks' counts when they give counts"
    )
    seed: int = Field(0, ge=0)
    split: str = "train=0.8,validation=0.1,test=0.1"
    tasks: list[Task] = Field(min_length=1)
    self_consistency: SelfConsistency = Field(default_factory=SelfConsistency)
    balance: Balance = Field(default_factory=Balance)
    sampling: TaskSampling = Field(default_factory=TaskSampling)
    mode: Literal["auto", "chat", "completion"] = Field(
        "auto", description="how the teacher is prompted: auto uses chat when the model has a chat template"
    )
    chat_template: str | None = Field(None, description="a built-in template name or a file, for GGUFs without one")
    judge: JudgeConfig | None = Field(None, description="a model scores each agreed answer on criteria; low means are dropped")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        check_line(self.name, "name")
        if not self.model.strip():
            raise Problem("model", "is empty")
        try:
            parse_split_spec(self.split)
        except ExportError as exc:
            raise Problem("split", str(exc)) from None
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            if task.name in seen:
                raise Problem(f"tasks[{i}].name", f"duplicate task name {task.name!r} (also tasks[{seen[task.name]}])")
            seen[task.name] = i
        self._check_sizes()
        return self

    def _check_sizes(self) -> None:
        modes = ["share" if t.share is not None else "count" if t.count is not None else None for t in self.tasks]
        if len(set(modes)) > 1:
            i = next(i for i, mode in enumerate(modes) if mode != modes[0])
            said = {"share": "gives a share", "count": "gives a count", None: "gives neither share nor count"}
            raise Problem(
                f"tasks[{i}]",
                f"{said[modes[i]]} while tasks[0] {said[modes[0]]}: give every task a share, or every task a count",
            )
        if modes[0] == "count":
            total = sum(t.count or 0 for t in self.tasks)
            if self.count is not None and self.count != total:
                raise Problem("count", f"is {self.count} but the tasks' counts add up to {total}")
            self.count = total
        else:
            if modes[0] == "share":
                total_share = sum(t.share or 0 for t in self.tasks)
                if abs(total_share - 1) > 1e-6:
                    raise Problem("tasks", f"the tasks' shares add up to {round(total_share, 6):g}, not 1")
            if self.count is None:
                raise Problem("count", "is missing: the number of examples to make in all")
        for i, (name, n) in enumerate(task_targets(self).items()):
            task = self.tasks[i]
            if n == 0:
                key = f"tasks[{i}].share" if task.share is not None else "count"
                raise Problem(key, f"gives task {name!r} none of the {self.count} examples")
            if isinstance(task, ClassifyTask):
                for label, m in label_targets(task, n).items():
                    if m == 0:
                        raise Problem(
                            f"tasks[{i}].count" if task.count is not None else "count",
                            f"task {name!r} gets {n} examples, none of them for label {label!r} "
                            f"(raise the count, or the label's weight)",
                        )

    @property
    def split_ratios(self) -> dict[str, float]:
        return parse_split_spec(self.split)

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"spec {self.name!r} has no task {name!r}")


# ---------------------------------------------------------------------------------------------
# Loading.


class LoadedTaskSpec(BaseModel):
    spec: TaskSpec
    path: str
    text: str
    sha256: str
    input_prompts: dict[str, PromptFile] = Field(default_factory=dict, description="task name -> its input_prompt")

    def resolve(self, relative: str) -> Path:
        """A path from the spec, relative to the spec file's folder."""
        return _resolve(self.path, relative)


def _resolve(spec_path: str, relative: str) -> Path:
    p = Path(relative).expanduser()
    return p if p.is_absolute() else Path(spec_path).parent / p


def _key(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as a key path, `tasks[1].labels[2].name` (without the union's kind tag)."""
    key = ""
    for n, part in enumerate(loc):
        if isinstance(part, int):
            key += f"[{part}]"
        elif not (n == 2 and loc[0] == "tasks" and part in KINDS):
            key += f".{part}" if key else part
    return key


def parse_task_spec(data: Any, where: str) -> TaskSpec:
    """Validate a parsed spec; every problem is one TaskSpecError line naming `where` and the key."""
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key, msg = _key(err["loc"]), err["msg"]
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, Problem):
            key, msg = ".".join(k for k in (key, problem.key) if k), problem.problem
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "is missing"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key, msg = f"{key}.kind", f"must be one of {', '.join(KINDS)}"
        else:
            msg = msg.removeprefix("Value error, ")
        raise TaskSpecError(f"task spec {where}: key '{key or '(top level)'}': {shorten(msg, 300)}") from None


def load_task_spec(path: str | Path) -> LoadedTaskSpec:
    """Read, parse and validate a task spec file, and load the input prompt files it names."""
    p, text, data = read_toml_file(path, "task spec", TaskSpecError)
    spec = parse_task_spec(data, str(p))
    prompts: dict[str, PromptFile] = {}
    for i, task in enumerate(spec.tasks):
        if task.input_prompt is None:
            continue
        where = f"task spec {p}: key 'tasks[{i}].input_prompt'"
        try:
            prompt = load_prompt(_resolve(str(p), task.input_prompt))
        except PromptError as exc:
            raise TaskSpecError(f"{where}: {exc}") from None
        unknown = sorted(set(prompt.variables) - INPUT_PROMPT_VARIABLES - set(task.axes))
        if unknown:
            available = ", ".join(sorted(INPUT_PROMPT_VARIABLES | set(task.axes)))
            raise TaskSpecError(f"{where}: the prompt uses {', '.join(unknown)}, not available (use {available})")
        prompts[task.name] = prompt
    return LoadedTaskSpec(
        spec=spec, path=str(p), text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), input_prompts=prompts
    )


# ---------------------------------------------------------------------------------------------
# Targets.


def _apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in proportion to `weights` by largest remainders; ties go to the earlier key."""
    whole = sum(weights.values())
    quotas = {k: total * w / whole for k, w in weights.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    by_remainder = sorted(weights, key=lambda k: counts[k] - quotas[k])
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def task_targets(spec: TaskSpec) -> dict[str, int]:
    """Examples wanted per task, in spec order; they add up to exactly `spec.count`."""
    if all(t.count is not None for t in spec.tasks):
        return {t.name: t.count or 0 for t in spec.tasks}
    return _apportion(spec.count or 0, {t.name: t.share or 1.0 for t in spec.tasks})


def label_targets(task: ClassifyTask, n: int) -> dict[str, int]:
    """Examples wanted per label out of the task's `n`, by the labels' weights (equal by default)."""
    return _apportion(n, {label.name: label.weight for label in task.labels})
