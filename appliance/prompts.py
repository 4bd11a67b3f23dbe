"""Prompt files: a short TOML header between `+++` lines, then the prompt as plain text with Jinja2 variables.

    +++
    name = "haiku"
    description = "Three-line poems about a topic, few-shot for a base model."
    stop = ["\\n\\n"]
    max_tokens = 48
    temperature = 0.8

    [vars]                       # defaults; a list means "vary": each item draws one value by its seed
    topic = ["the sea", "winter", "a city at night"]
    +++
    Haiku about autumn:
    Leaves fall without sound ...

    Haiku about {{ topic }}:

The body is what the model completes, few-shot examples written out as normal text. The header is
optional. Templates run in Jinja2's sandbox with strict undefined variables.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PromptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FENCE = "+++"
VarValue = str | int | float | bool
# The file's final newline is not part of the prompt: a body ending in a cue line ("Review:") must end
# there, as every few-shot answer starts on its cue's own line; a trailing newline made the model end
# or stop before writing anything.
_ENV = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
)


class PromptHeader(BaseModel):
    """What a prompt file may say about itself; unknown keys are an error (typos would pass silently)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    system: str | None = Field(None, description="system text, used only when the model has a chat template")
    stop: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    vars: dict[str, VarValue | list[VarValue]] = Field(default_factory=dict)

    @field_validator("vars")
    @classmethod
    def _no_empty_lists(cls, value: dict[str, Any]) -> dict[str, Any]:
        empty = [k for k, v in value.items() if isinstance(v, list) and not v]
        if empty:
            raise ValueError(f"{_plural('variable', empty)} {'is an' if len(empty) == 1 else 'are'} empty list "
                             "(give at least one value to vary over)")
        return value


class PromptFile(BaseModel):
    name: str
    path: str | None
    text: str = Field(description="the whole file, as stored in the prompts table")
    sha256: str
    header: PromptHeader
    template: str
    variables: list[str] = Field(description="variables the template uses")

    def render(self, values: dict[str, Any]) -> str:
        missing = [v for v in self.variables if v not in values]
        if missing:
            flags = " ".join(f"--var {v}=..." for v in missing)
            raise PromptError(f"prompt {self.name} uses {_plural('variable', missing)} not given: {flags}")
        try:
            return _ENV.from_string(self.template).render(**values)
        except jinja2.TemplateError as exc:
            raise PromptError(f"prompt {self.name}: {exc}") from None
        except Exception as exc:  # errors of the template's own expressions, e.g. {{ name + 1 }}
            raise PromptError(f"prompt {self.name}: template failed: {type(exc).__name__}: {exc}") from None

    def values_for_item(self, given: dict[str, VarValue], seed: int) -> dict[str, VarValue]:
        """Header defaults overridden by `given`; a list default is varied: the item's seed picks one value."""
        rng = random.Random(seed)
        values: dict[str, VarValue] = {}
        for key, default in self.header.vars.items():
            values[key] = rng.choice(default) if isinstance(default, list) and default else default  # type: ignore[assignment]
        values.update(given)
        return values


def _plural(word: str, items: list[str]) -> str:
    quoted = ", ".join(repr(i) for i in items)
    return f"{word}{'s' if len(items) > 1 else ''} {quoted}"


def parse_prompt(text: str, name: str, path: str | None = None) -> PromptFile:
    """Parse a prompt file's text; every problem is a one-line PromptError naming the file."""
    where = path or name
    header_data: dict[str, Any] = {}
    body, body_start = text, 0
    if text.lstrip("\ufeff").startswith(FENCE):
        lines = text.lstrip("\ufeff").split("\n")
        try:
            end = next(i for i in range(1, len(lines)) if lines[i].strip() == FENCE)
        except StopIteration:
            raise PromptError(f"{where}: the header opened with '+++' is never closed") from None
        try:
            header_data = tomllib.loads("\n".join(lines[1:end]))
        except tomllib.TOMLDecodeError as exc:
            raise PromptError(f"{where}: header is not valid TOML: {exc}") from None
        body, body_start = "\n".join(lines[end + 1 :]), end + 1
    try:
        header = PromptHeader.model_validate(header_data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise PromptError(f"{where}: header key '{key}': {err['msg'].removeprefix('Value error, ')}") from None
    if not body.strip():
        raise PromptError(f"{where}: the prompt has no text after its header")
    try:
        ast = _ENV.parse(body)
    except jinja2.TemplateSyntaxError as exc:
        raise PromptError(f"{where}, line {exc.lineno + body_start}: template error: {exc.message}") from None
    variables = sorted(jinja2.meta.find_undeclared_variables(ast))
    return PromptFile(
        name=header.name or name,
        path=path,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        header=header,
        template=body,
        variables=variables,
    )


def load_prompt(path: str | Path) -> PromptFile:
    p = Path(path)
    if not p.exists():
        raise PromptError(f"no such prompt file: {p}")
    if p.is_dir():
        raise PromptError(f"{p} is a directory, not a prompt file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {p}: {exc.strerror}") from None
    if not raw.strip():
        raise PromptError(f"prompt file {p} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file {p} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if "\x00" in text:
        raise PromptError(f"prompt file {p} looks binary (it contains NUL bytes)")
    return parse_prompt(text, name=p.stem, path=str(p))


def check_used(prompt: PromptFile, names: Iterable[str], what: str) -> None:
    """Refuse values the prompt never uses (a misspelt `--var`, an axis the prompt does not vary): they
    would be ignored silently while the prompt's defaults fill the variable it does use."""
    unused = [n for n in names if n not in prompt.variables]
    if unused:
        has = ", ".join(prompt.variables) or "none"
        raise PromptError(f"{what} {', '.join(repr(u) for u in unused)} not used by prompt {prompt.path or prompt.name} "
                          f"(its variables: {has})")


def parse_var(item: str) -> tuple[str, str]:
    """`key=value` from the command line."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise PromptError(f"--var expects key=value with a name for key, got {item!r}")
    return key, value
