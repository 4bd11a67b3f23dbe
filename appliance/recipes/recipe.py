"""Recipes: one TOML file that says what dataset to make, validated with pydantic.

    kind = "annotated"                     # synthetic | annotated | augmented
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ApplianceError, validation_problem
from ..runs.files import Sampling, read_toml_file
from ..runs.items import RecipeKind


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
    # -- magpie (recipes/magpie.py) --
    magpie: bool = Field(False, description="synthetic: the model writes each request itself from its chat template's "
                                            "pre-query text (the optional `system` steers it), then answers it")

    @model_validator(mode="after")
    def _by_kind(self) -> "Recipe":
        if self.kind == "synthetic" and self.count is None:
            raise ValueError("a synthetic recipe needs count")
        if self.magpie:
            _check_magpie(self)
        elif self.prompt is None:
            raise ValueError("a recipe needs prompt (a prompt file)")
        if self.kind != "synthetic" and not self.sources:
            raise ValueError(f"an {self.kind} recipe needs sources")
        for axis, values in self.axes.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
        return self


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
