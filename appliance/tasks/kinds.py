"""The three kinds of task a task spec mixes (classify, extract, transform), each validated as it is read,
and the small text rules their prompts share (one line, a field's title)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.filters import json_validator
from ..data.metrics import INVALID
from .grammars import classify_gbnf, extract_gbnf, gbnf_parses

KINDS = ("classify", "extract", "transform")
MAX_COUNT = 1_000_000
INPUT_PROMPT_VARIABLES = frozenset(
    {"label", "description", "examples", "shots", "edge_case", "hard_negative", "hard_negative_description"}
)
"""Variables a task's own `input_prompt` file may use, besides the task's axes."""


class Problem(ValueError):
    """A problem at `key`, a path relative to the model whose validator raises it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


class Strict(BaseModel):
    # strict: "16" is not a number (TOML says what type a value is; a quoted number is a typo)
    model_config = ConfigDict(extra="forbid", strict=True)


def check_line(text: str, key: str) -> None:
    """`text` is one line that is not blank."""
    if not text.strip():
        raise Problem(key, "is empty")
    if "\n" in text or "\r" in text:
        raise Problem(key, "must be one line (no line breaks)")


def flat(text: str) -> str:
    """One line: runs of whitespace, line breaks included, become one space."""
    return " ".join(text.split())


def title(name: str) -> str:
    """How a name reads as a field in a prompt: `speaking_style` -> `Speaking style`."""
    words = name.replace("_", " ").replace("-", " ")
    return words[:1].upper() + words[1:]


def is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def shorten(text: str, limit: int = 200) -> str:
    text = flat(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The models.


class Label(Strict):
    name: str = Field(description="the exact output text for this class")
    description: str = Field(description="what the label means, shown to the teacher and the student")
    examples: list[str] = Field(min_length=1, description="inputs of this label; the first is the few-shot example")
    weight: float = Field(1.0, gt=0, le=1000, description="relative share of the task's examples")

    @model_validator(mode="after")
    def _check(self) -> Label:
        if not self.name or self.name != self.name.strip() or not self.name.isprintable():
            raise Problem("name", "must be printable text without line breaks or surrounding spaces")
        if self.name == INVALID:
            raise Problem("name", f"{INVALID!r} is reserved for invalid predictions")
        check_line(self.description, "description")
        for j, example in enumerate(self.examples):
            check_line(example, f"examples[{j}]")
        return self


class _TaskBase(Strict):
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
            raise Problem("name", "must be 1-40 letters, digits, '_' or '-', starting with a letter")
        if self.share is not None and self.count is not None:
            raise Problem("count", "give a task a share or a count, not both")
        if not self.system.strip():
            raise Problem("system", "is empty")
        if self.input_prompt is not None and not self.input_prompt.strip():
            raise Problem("input_prompt", "is empty")
        if self.input_description is not None:
            check_line(self.input_description, "input_description")
        check_line(self.input_name, "input_name")
        if ":" in self.input_name:
            raise Problem("input_name", "must not contain ':'")
        for axis, values in self.axes.items():
            if not axis.isidentifier():
                raise Problem(f"axes.{axis}", "axis names are letters, digits and '_' (not starting with a digit)")
            if axis in INPUT_PROMPT_VARIABLES:
                raise Problem(f"axes.{axis}", "is a reserved name (pick another axis name)")
            if not values:
                raise Problem(f"axes.{axis}", "has no values")
            for j, value in enumerate(values):
                check_line(value, f"axes.{axis}[{j}]")
        for j, case in enumerate(self.edge_cases):
            check_line(case, f"edge_cases[{j}]")
        return self


class ClassifyTask(_TaskBase):
    """Outputs are the bare label name."""

    kind: Literal["classify"]
    labels: list[Label]
    hard_negatives: list[tuple[str, str]] = Field(
        default_factory=list, description="pairs of labels easy to confuse; inputs are written near the boundary"
    )
    hard_negative_share: float = Field(0.2, ge=0, le=1, description="part of the inputs written as hard negatives")

    @field_validator("hard_negatives", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """TOML and JSON have arrays, not tuples: a pair of two names is a pair."""
        return [tuple(p) if isinstance(p, list) else p for p in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check(self) -> ClassifyTask:
        if len(self.labels) < 2:
            raise Problem("labels", f"a classify task needs at least 2 labels, got {len(self.labels)}")
        seen: dict[str, int] = {}
        examples: dict[str, str] = {}
        for i, label in enumerate(self.labels):
            if label.name in seen:
                raise Problem(f"labels[{i}].name", f"duplicate label {label.name!r} (also labels[{seen[label.name]}])")
            seen[label.name] = i
            for j, example in enumerate(label.examples):
                key = flat(example).casefold()
                if key in examples:
                    raise Problem(f"labels[{i}].examples[{j}]", f"is already an example of label {examples[key]!r}")
                examples[key] = label.name
        pairs: set[frozenset[str]] = set()
        for i, pair in enumerate(self.hard_negatives):
            for name in pair:
                if name not in seen:
                    raise Problem(f"hard_negatives[{i}]", f"{name!r} is not a label of this task")
            if pair[0] == pair[1]:
                raise Problem(f"hard_negatives[{i}]", "pairs a label with itself")
            if frozenset(pair) in pairs:
                raise Problem(f"hard_negatives[{i}]", "is listed twice")
            pairs.add(frozenset(pair))
        if self.edge_case_share + self.hard_negative_share > 1:
            raise Problem("hard_negative_share", "edge_case_share and hard_negative_share add up to more than 1")
        if not gbnf_parses(classify_gbnf(self.label_names)):
            raise Problem("labels", "llama.cpp cannot parse the grammar made of the labels")
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


class ExtractExample(Strict):
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
        if not is_json(schema):
            raise Problem("schema", "holds a value that is not JSON (a TOML date or time?)")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise Problem("schema", f"invalid JSON schema at {exc.json_path}: {shorten(exc.message)}") from None
        if schema.get("type") != "object":
            raise Problem("schema.type", 'must be "object": an extract task outputs one JSON object')
        if not isinstance(schema.get("properties"), dict) or not schema["properties"]:
            raise Problem("schema.properties", "must name at least one field")
        try:
            grammar = extract_gbnf(schema)
        except Exception as exc:  # the converter raises bare Exceptions and AssertionErrors
            reason = shorten(str(exc)) or type(exc).__name__
            raise Problem("schema", f"llama.cpp cannot make a grammar of it: {reason}") from None
        if not gbnf_parses(grammar):
            raise Problem("schema", "llama.cpp cannot parse the grammar made of it (a control character in a name?)")
        validator = json_validator(schema)
        for j, example in enumerate(self.examples):
            check_line(example.input, f"examples[{j}].input")
            if not is_json(example.output):
                raise Problem(f"examples[{j}].output", "holds a value that is not JSON (a TOML date or time?)")
            error = jsonschema.exceptions.best_match(validator.iter_errors(example.output))
            if error is not None:
                raise Problem(
                    f"examples[{j}].output", f"does not match the schema: {error.json_path}: {shorten(error.message)}"
                )
        return self

    def example_inputs(self) -> list[str]:
        return [example.input for example in self.examples]


class TransformExample(Strict):
    input: str
    output: str


class TransformTask(_TaskBase):
    """Outputs are free text in `style`; they may span lines but hold no blank line."""

    kind: Literal["transform"]
    style: str = Field(description="one sentence on the output's style or format")
    examples: list[TransformExample] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TransformTask:
        check_line(self.style, "style")
        for j, example in enumerate(self.examples):
            check_line(example.input, f"examples[{j}].input")
            if not example.output.strip():
                raise Problem(f"examples[{j}].output", "is empty")
            if any(not line.strip() for line in example.output.strip().splitlines()):
                raise Problem(f"examples[{j}].output", "holds a blank line (an output ends at a blank line)")
        return self

    def example_inputs(self) -> list[str]:
        return [example.input for example in self.examples]


Task = Annotated[ClassifyTask | ExtractTask | TransformTask, Field(discriminator="kind")]
"""Any task (a type for annotations: it is the union of the three, told apart by `kind`)."""


