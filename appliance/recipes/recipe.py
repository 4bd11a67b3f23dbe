"""Recipes: one TOML file that says what dataset to make, validated with pydantic.

    kind = "annotated"                     # synthetic | annotated | augmented | preference | conversation
    name = "coriolanus-speeches"
    model = "gemma-3-270m-q4_k_m"          # a registered name or a path to a .gguf
    prompt = "../prompts/annotate-instruction.md"   # paths are relative to the recipe file
    sources = ["data/coriolanus.txt"]      # annotated and augmented: files or folders (.txt, .md, .jsonl)
    count = 24                             # synthetic: items to make; others: at most this many chunks
    seed = 1

    [axes]                                 # synthetic: variation axes, combined and sampled per item
    tone = ["cheerful", "grumpy"]

    [chunking]
    max_tokens = 160
    min_tokens = 40

    [sampling]
    temperature = 0.7
    max_tokens = 64

A conversation recipe (`appliance.recipes.conversation`) adds `turns`, `user_prompt` and `on_bad_turn`;
its `sources` are optional (without them its conversations come from the axes alone, and it needs count).

    [filters]
    min_words = 3
    echo_max_length_ratio = 1.0

A synthetic recipe with `magpie = true` has no prompt file: an instruct model writes each request itself
from its chat template's pre-query text, steered by `system` (a Jinja2 template over the axes), then
answers it (`appliance.recipes.magpie`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import ApplianceError, validation_problem
from ..runs.files import Sampling, read_toml_file
from ..runs.items import MAX_RESPONSES, MAX_TURNS, RecipeKind
from ..runs.rubric import JudgeConfig


FROM_AXES = ("synthetic", "preference")  # kinds whose items come from axis combinations (`count`), not from sources


class RecipeError(ApplianceError):
    """A recipe file that cannot be read or does not validate."""


AxisValue = str | int | float | bool


class _Strict(BaseModel):
    # strict: "16" is not a number (TOML says what type a value is; a quoted number is a typo)
    model_config = ConfigDict(extra="forbid", strict=True)


class Chunking(_Strict):
    max_tokens: int = Field(200, gt=8, le=8192)
    min_tokens: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "Chunking":
        if self.min_tokens >= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be below max_tokens ({self.max_tokens})")
        return self


class Filters(_Strict):
    """Thresholds of the filters every generation goes through; each verdict is stored with its reason."""

    allow_truncated: bool = False
    min_words: int | None = Field(2, ge=0)
    max_words: int | None = Field(None, gt=0)
    near_duplicate_threshold: float | None = Field(0.8, gt=0, le=1, description="None turns de-duplication off")
    echo_max_length_ratio: float = Field(1.0, gt=0, description="annotated: instruction words / output words")
    echo_max_ngram_overlap: float = Field(0.3, ge=0, le=1, description="annotated: share of output 3-grams in the instruction")
    echo_max_shared_run: int = Field(12, gt=0, description="annotated: longest run of output words copied verbatim")
    grounding_min_score: float = Field(0.5, ge=0, le=1, description="augmented: share of answer words found in the chunk")
    fidelity: list[str] = Field(default_factory=list, description="synthetic: axes whose value the model re-labels each output with")
    fidelity_prompt: str | None = Field(None, description="prompt file of the fidelity check (uses text, axis, values)")


class Recipe(_Strict):
    kind: RecipeKind
    name: str | None = None
    model: str
    prompt: str | None = Field(None, description="the prompt file (every recipe but a magpie one needs it)")
    count: int | None = Field(None, gt=0, le=1_000_000)
    seed: int = Field(0, ge=0)
    system: str | None = Field(
        None, description="system prompt: the model's system message in chat mode, and written into exported examples"
    )
    mode: Literal["auto", "chat", "completion"] | None = Field(
        None, description="how prompts reach the model (None: the prompt file's mode, which defaults to auto)"
    )
    chat_template: str | None = Field(None, description="a built-in template name or a file, for GGUFs without one")
    instruction: str | None = Field(
        None, description="synthetic: the instruction exported with each output (a Jinja2 template over the axes)"
    )
    sources: list[str] = Field(default_factory=list)
    jsonl_field: str = "text"
    axes: dict[str, list[AxisValue]] = Field(default_factory=dict)
    vars: dict[str, AxisValue] = Field(default_factory=dict)
    chunking: Chunking = Field(default_factory=Chunking)
    sampling: Sampling = Field(default_factory=Sampling)
    filters: Filters = Field(default_factory=Filters)
    schema_file: str | None = Field(None, alias="schema", description="JSON schema the outputs must follow")
    parallel: int | None = Field(None, gt=0)
    # magpie (`appliance.recipes.magpie`)
    magpie: bool = Field(False, description="synthetic: the model writes each request itself from its chat template's "
                                            "pre-query text (the optional `system` steers it), then answers it")
    # the rubric judge (any kind; `appliance.runs.rubric`) and preference pairs (`appliance.recipes.preference`)
    judge: JudgeConfig | None = Field(None, description="a model scores each output on criteria; low means are dropped")
    responses: int | None = Field(None, ge=2, le=MAX_RESPONSES, description="preference: responses per instruction (default 2)")
    temperatures: list[float] | None = Field(
        None, min_length=1, description="preference: response r's temperature, cycled over r (default: a spread around sampling.temperature)"
    )
    min_margin: float | None = Field(None, description="preference: the least score difference between chosen and rejected (default 1)")
    # conversation recipes (kind = "conversation"), appliance.recipes.conversation
    turns: int | None = Field(None, validate_default=True, description="conversation: user/assistant exchanges per conversation")
    user_prompt: str | None = Field(None, validate_default=True, description="conversation: prompt file of the user's side")
    on_bad_turn: Literal["drop", "cut"] = Field(
        "drop", description="conversation: a turn fails a filter -> drop the conversation, or cut it after its last good exchange")

    @field_validator("turns")
    @classmethod
    def _turns(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("kind") == "conversation":
            raise ValueError(f"a conversation recipe needs turns (1 to {MAX_TURNS} user/assistant exchanges)")
        if value is not None and not 1 <= value <= MAX_TURNS:
            raise ValueError(f"a conversation has 1 to {MAX_TURNS} turns, got {value}")
        return value

    @field_validator("user_prompt")
    @classmethod
    def _user_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("kind") == "conversation":
            raise ValueError("a conversation recipe needs user_prompt, the prompt file of the user's side "
                             "(e.g. \"../prompts/conversation-user.md\")")
        return value

    @model_validator(mode="after")
    def _by_kind(self) -> "Recipe":
        if self.kind in FROM_AXES and self.count is None:
            raise ValueError(f"a {self.kind} recipe needs count")
        if self.kind == "conversation" and not self.sources and self.count is None:
            raise ValueError("a conversation recipe without sources needs count (conversations made from the axes)")
        if self.magpie:
            _check_magpie(self)
        elif self.prompt is None:
            raise ValueError("a recipe needs prompt (a prompt file)")
        if self.kind not in (*FROM_AXES, "conversation") and not self.sources:
            raise ValueError(f"an {self.kind} recipe needs sources")
        given = [k for k in ("turns", "user_prompt", "on_bad_turn") if k in self.model_fields_set]
        if self.kind != "conversation" and given:
            raise ValueError(f"{', '.join(given)}: only conversation recipes have {'it' if len(given) == 1 else 'them'}")
        for axis, values in self.axes.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
        return self._preference()

    def _preference(self) -> "Recipe":
        keys = [k for k in ("responses", "temperatures", "min_margin") if getattr(self, k) is not None]
        if self.kind != "preference":
            if keys:
                raise ValueError(f"{', '.join(keys)}: only preference recipes have these keys")
            return self
        if self.judge is None:
            raise ValueError("a preference recipe needs a [judge] table (it chooses between the responses)")
        if any(t < 0 for t in self.temperatures or []):
            raise ValueError("temperatures must be 0 or more")
        span = self.judge.high - self.judge.low
        if self.min_margin is not None and not 0 < self.min_margin <= span:
            raise ValueError(f"min_margin {self.min_margin:g} is outside the judge's scale {self.judge.low}-{self.judge.high} "
                             f"(a margin above 0 and at most {span})")
        return self

    @property
    def n_responses(self) -> int:
        return self.responses or 2

    @property
    def margin(self) -> float:
        return self.min_margin if self.min_margin is not None else 1.0


def _check_magpie(recipe: Recipe) -> None:
    """A magpie recipe writes its own requests: keys that feed a prompt file have nothing to act on."""
    if recipe.kind != "synthetic":
        raise ValueError(f"magpie is a synthetic recipe key, not for an {recipe.kind} recipe")
    if recipe.mode == "completion":
        raise ValueError("magpie needs chat mode (an instruct model's chat template writes the pre-query text), not completion")
    unused = [key for key, given in (("prompt", recipe.prompt), ("instruction", recipe.instruction),
                                     ("schema", recipe.schema_file), ("filters.fidelity", recipe.filters.fidelity)) if given]
    if unused:
        raise ValueError(f"a magpie recipe writes its own requests, so {', '.join(unused)} would be ignored: remove "
                         f"{'it' if len(unused) == 1 else 'them'} (the axes steer it through `system`)")


class LoadedRecipe(BaseModel):
    recipe: Recipe
    path: str
    text: str
    sha256: str

    def resolve(self, relative: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(self.path).parent / p


def load_recipe(path: str | Path) -> LoadedRecipe:
    p, text, data = read_toml_file(path, "recipe", RecipeError)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        key, msg = validation_problem(exc)
        raise RecipeError(f"recipe {p}: key '{key}': {msg}") from None
    return LoadedRecipe(recipe=recipe, path=str(p), text=text, sha256=hashlib.sha256(text.encode()).hexdigest())
