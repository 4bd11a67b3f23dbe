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

Prompts, output grammars and parsing live in `appliance/taskprompts.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ApplianceError, PromptError
from ..export import ExportError, parse_split_spec
from ..data.metrics import INVALID
from ..prompts.files import PromptFile, load_prompt
from ..data.filters import json_validator
from ..recipes.recipe import Sampling, read_toml_file

KINDS = ("classify", "extract", "transform")
MAX_COUNT = 1_000_000
INPUT_PROMPT_VARIABLES = frozenset(
    {"label", "description", "examples", "shots", "edge_case", "hard_negative", "hard_negative_description"}
)
"""Variables a task's own `input_prompt` file may use, besides the task's axes."""


class TaskSpecError(ApplianceError):
    """A task spec file that cannot be read or does not validate."""


class _Problem(ValueError):
    """A problem at `key`, a path relative to the model whose validator raises it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _line(text: str, key: str) -> None:
    """`text` is one line that is not blank."""
    if not text.strip():
        raise _Problem(key, "is empty")
    if "\n" in text or "\r" in text:
        raise _Problem(key, "must be one line (no line breaks)")


def _flat(text: str) -> str:
    """One line: runs of whitespace, line breaks included, become one space."""
    return " ".join(text.split())


def _title(name: str) -> str:
    """How a name reads as a field in a prompt: `speaking_style` -> `Speaking style`."""
    words = name.replace("_", " ").replace("-", " ")
    return words[:1].upper() + words[1:]


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _short(text: str, limit: int = 200) -> str:
    text = _flat(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The models.


class Label(_Strict):
    name: str = Field(description="the exact output text for this class")
    description: str = Field(description="what the label means, shown to the teacher and the student")
    examples: list[str] = Field(min_length=1, description="inputs of this label; the first is the few-shot example")
    weight: float = Field(1.0, gt=0, le=1000, description="relative share of the task's examples")

    @model_validator(mode="after")
    def _check(self) -> Label:
        if not self.name or self.name != self.name.strip() or not self.name.isprintable():
            raise _Problem("name", "must be printable text without line breaks or surrounding spaces")
        if self.name == INVALID:
            raise _Problem("name", f"{INVALID!r} is reserved for invalid predictions")
        _line(self.description, "description")
        for j, example in enumerate(self.examples):
            _line(example, f"examples[{j}]")
        return self


class _TaskBase(_Strict):
    name: str
    share: float | None = Field(None, gt=0, le=1, description="part of the spec's count")
    count: int | None = Field(None, gt=0, le=MAX_COUNT, description="examples of this task (instead of share)")
    system: str = Field(description="the instruction that opens the task prompt and goes out with each example")
    input_prompt: str | None = Field(None, description="a prompt file that writes one input, relative to the spec")
    input_description: str | None = Field(None, description="heads the built-in input-writing prompt (else system)")
    input_name: str = Field("Input", description="what one input is called in the input-writing prompt")
    axes: dict[str, list[str]] = Field(
        default_factory=dict, description="variation of the inputs; prompts show the values alone, not the axis name"
    )
    edge_cases: list[str] = Field(default_factory=list)
    edge_case_share: float = Field(0.2, ge=0, le=1, description="part of the inputs written as an edge case")

    @model_validator(mode="after")
    def _check_base(self) -> _TaskBase:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,39}", self.name):
            raise _Problem("name", "must be 1-40 letters, digits, '_' or '-', starting with a letter")
        if self.share is not None and self.count is not None:
            raise _Problem("count", "give a task a share or a count, not both")
        if not self.system.strip():
            raise _Problem("system", "is empty")
        if self.input_prompt is not None and not self.input_prompt.strip():
            raise _Problem("input_prompt", "is empty")
        if self.input_description is not None:
            _line(self.input_description, "input_description")
        _line(self.input_name, "input_name")
        if ":" in self.input_name:
            raise _Problem("input_name", "must not contain ':'")
        for axis, values in self.axes.items():
            if not axis.isidentifier():
                raise _Problem(f"axes.{axis}", "axis names are letters, digits and '_' (not starting with a digit)")
            if axis in INPUT_PROMPT_VARIABLES:
                raise _Problem(f"axes.{axis}", "is a reserved name (pick another axis name)")
            if not values:
                raise _Problem(f"axes.{axis}", "has no values")
            for j, value in enumerate(values):
                _line(value, f"axes.{axis}[{j}]")
        for j, case in enumerate(self.edge_cases):
            _line(case, f"edge_cases[{j}]")
        return self


class ClassifyTask(_TaskBase):
    """Outputs are the bare label name."""

    kind: Literal["classify"]
    labels: list[Label]
    hard_negatives: list[tuple[str, str]] = Field(
        default_factory=list, description="pairs of labels easy to confuse; inputs are written near the boundary"
    )
    hard_negative_share: float = Field(0.2, ge=0, le=1, description="part of the inputs written as hard negatives")

    @model_validator(mode="after")
    def _check(self) -> ClassifyTask:
        if len(self.labels) < 2:
            raise _Problem("labels", f"a classify task needs at least 2 labels, got {len(self.labels)}")
        seen: dict[str, int] = {}
        examples: dict[str, str] = {}
        for i, label in enumerate(self.labels):
            if label.name in seen:
                raise _Problem(f"labels[{i}].name", f"duplicate label {label.name!r} (also labels[{seen[label.name]}])")
            seen[label.name] = i
            for j, example in enumerate(label.examples):
                key = _flat(example).casefold()
                if key in examples:
                    raise _Problem(f"labels[{i}].examples[{j}]", f"is already an example of label {examples[key]!r}")
                examples[key] = label.name
        pairs: set[frozenset[str]] = set()
        for i, pair in enumerate(self.hard_negatives):
            for name in pair:
                if name not in seen:
                    raise _Problem(f"hard_negatives[{i}]", f"{name!r} is not a label of this task")
            if pair[0] == pair[1]:
                raise _Problem(f"hard_negatives[{i}]", "pairs a label with itself")
            if frozenset(pair) in pairs:
                raise _Problem(f"hard_negatives[{i}]", "is listed twice")
            pairs.add(frozenset(pair))
        if self.edge_case_share + self.hard_negative_share > 1:
            raise _Problem("hard_negative_share", "edge_case_share and hard_negative_share add up to more than 1")
        from .prompts import grammar_parses, output_grammar  # builds on these models: imported late

        if not grammar_parses(output_grammar(self) or ""):
            raise _Problem("labels", "llama.cpp cannot parse the grammar made of the labels")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise ValueError(f"task {self.name!r} has no label {name!r}")

    def confusable(self, name: str) -> list[str]:
        """The labels paired with `name` in hard_negatives."""
        return [b if a == name else a for a, b in self.hard_negatives if name in (a, b)]

    def example_inputs(self) -> list[str]:
        return [example for label in self.labels for example in label.examples]


class ExtractExample(_Strict):
    input: str
    output: dict[str, Any] = Field(description="a TOML table, or JSON text (TOML has no null)")

    @field_validator("output", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not JSON: {exc}") from None
        return value


class ExtractTask(_TaskBase):
    """Outputs are one JSON object under `schema`, written on one line."""

    kind: Literal["extract"]
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON schema (draft 2020-12) of one object")
    examples: list[ExtractExample] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ExtractTask:
        schema = self.json_schema
        if not _is_json(schema):
            raise _Problem("schema", "holds a value that is not JSON (a TOML date or time?)")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise _Problem("schema", f"invalid JSON schema at {exc.json_path}: {_short(exc.message)}") from None
        if schema.get("type") != "object":
            raise _Problem("schema.type", 'must be "object": an extract task outputs one JSON object')
        if not isinstance(schema.get("properties"), dict) or not schema["properties"]:
            raise _Problem("schema.properties", "must name at least one field")
        from .prompts import grammar_parses, output_grammar  # builds on these models: imported late

        try:
            grammar = output_grammar(self)
        except Exception as exc:  # the converter raises bare Exceptions and AssertionErrors
            reason = _short(str(exc)) or type(exc).__name__
            raise _Problem("schema", f"llama.cpp cannot make a grammar of it: {reason}") from None
        if not grammar_parses(grammar or ""):
            raise _Problem("schema", "llama.cpp cannot parse the grammar made of it (a control character in a name?)")
        validator = json_validator(schema)
        for j, example in enumerate(self.examples):
            _line(example.input, f"examples[{j}].input")
            if not _is_json(example.output):
                raise _Problem(f"examples[{j}].output", "holds a value that is not JSON (a TOML date or time?)")
            error = jsonschema.exceptions.best_match(validator.iter_errors(example.output))
            if error is not None:
                raise _Problem(
                    f"examples[{j}].output", f"does not match the schema: {error.json_path}: {_short(error.message)}"
                )
        return self

    def example_inputs(self) -> list[str]:
        return [example.input for example in self.examples]


class TransformExample(_Strict):
    input: str
    output: str


class TransformTask(_TaskBase):
    """Outputs are free text in `style`; they may span lines but hold no blank line."""

    kind: Literal["transform"]
    style: str = Field(description="one sentence on the output's style or format")
    examples: list[TransformExample] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TransformTask:
        _line(self.style, "style")
        for j, example in enumerate(self.examples):
            _line(example.input, f"examples[{j}].input")
            if not example.output.strip():
                raise _Problem(f"examples[{j}].output", "is empty")
            if any(not line.strip() for line in example.output.strip().splitlines()):
                raise _Problem(f"examples[{j}].output", "holds a blank line (an output ends at a blank line)")
        return self

    def example_inputs(self) -> list[str]:
        return [example.input for example in self.examples]


Task = Annotated[ClassifyTask | ExtractTask | TransformTask, Field(discriminator="kind")]
"""Any task (a type for annotations: it is the union of the three, told apart by `kind`)."""


class SelfConsistency(_Strict):
    """Each output is sampled `samples` times; the majority wins, its share of the samples is the confidence."""

    samples: int = Field(3, ge=1, le=20, description="1 turns self-consistency off")
    min_agreement: float = Field(
        0.6, gt=0, le=1, description="items whose majority share is below this are flagged (2 of 3 is 0.667)"
    )


class Balance(_Strict):
    tolerance: float = Field(0.2, ge=0, le=1, description="each label's count may miss its target by this share")

    def bounds(self, target: int) -> tuple[int, int]:
        """The counts a label with `target` examples may end with, rounded outward."""
        return math.floor(target * (1 - self.tolerance)), math.ceil(target * (1 + self.tolerance))


class TaskSampling(_Strict):
    inputs: Sampling = Field(default_factory=Sampling, description="the teacher writing inputs")
    outputs: Sampling = Field(default_factory=Sampling, description="the teacher writing outputs (labels)")


class TaskSpec(_Strict):
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

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        _line(self.name, "name")
        if not self.model.strip():
            raise _Problem("model", "is empty")
        try:
            parse_split_spec(self.split)
        except ExportError as exc:
            raise _Problem("split", str(exc)) from None
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            if task.name in seen:
                raise _Problem(f"tasks[{i}].name", f"duplicate task name {task.name!r} (also tasks[{seen[task.name]}])")
            seen[task.name] = i
        self._check_sizes()
        return self

    def _check_sizes(self) -> None:
        modes = ["share" if t.share is not None else "count" if t.count is not None else None for t in self.tasks]
        if len(set(modes)) > 1:
            i = next(i for i, mode in enumerate(modes) if mode != modes[0])
            said = {"share": "gives a share", "count": "gives a count", None: "gives neither share nor count"}
            raise _Problem(
                f"tasks[{i}]",
                f"{said[modes[i]]} while tasks[0] {said[modes[0]]}: give every task a share, or every task a count",
            )
        if modes[0] == "count":
            total = sum(t.count or 0 for t in self.tasks)
            if self.count is not None and self.count != total:
                raise _Problem("count", f"is {self.count} but the tasks' counts add up to {total}")
            self.count = total
        else:
            if modes[0] == "share":
                total_share = sum(t.share or 0 for t in self.tasks)
                if abs(total_share - 1) > 1e-6:
                    raise _Problem("tasks", f"the tasks' shares add up to {round(total_share, 6):g}, not 1")
            if self.count is None:
                raise _Problem("count", "is missing: the number of examples to make in all")
        for i, (name, n) in enumerate(task_targets(self).items()):
            task = self.tasks[i]
            if n == 0:
                key = f"tasks[{i}].share" if task.share is not None else "count"
                raise _Problem(key, f"gives task {name!r} none of the {self.count} examples")
            if isinstance(task, ClassifyTask):
                for label, m in label_targets(task, n).items():
                    if m == 0:
                        raise _Problem(
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
        if isinstance(problem, _Problem):
            key, msg = ".".join(k for k in (key, problem.key) if k), problem.problem
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "is missing"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key, msg = f"{key}.kind", f"must be one of {', '.join(KINDS)}"
        else:
            msg = msg.removeprefix("Value error, ")
        raise TaskSpecError(f"task spec {where}: key '{key or '(top level)'}': {_short(msg, 300)}") from None


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
