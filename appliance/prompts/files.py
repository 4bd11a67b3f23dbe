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

Turns, for instruct models: a line that is exactly `### system`, `### user` or `### assistant`
(trailing spaces allowed) starts a turn, which runs to the next marker line.

    +++
    system = "You label the sentiment of product reviews with one word."
    +++
    Label each review as positive or negative.
    ### user
    Review: The kettle boils in a minute and looks great.
    ### assistant
    positive
    ### user
    Review: {{ review }}

  - Text before the first marker (if not blank) is prepended to the first user turn, separated by a
    blank line.
  - An optional `### system` turn comes first (not together with the header's `system` key); after it
    the turns alternate user, assistant, user, ... and the last one is a user turn (the model answers it).
  - Each turn is a Jinja2 template of its own (variables as anywhere in the body; an `{% if %}` or
    `{% for %}` opens and closes within one turn) and its rendered text is stripped of surrounding
    whitespace. Variable values never create turns: markers are found before rendering.
  - Chat mode: the system text (header or turn), then alternating user/assistant messages.
  - Completion mode: the system text is left out; the user and assistant texts in order, separated by a
    blank line, ending with the final user text (nothing after it). A body without markers is one user
    turn, and in completion mode exactly the rendered body.

Header key `mode`: "auto" (default), "chat" or "completion"; the rule is in `appliance.chat`.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jinja2
import jinja2.meta
import jinja2.sandbox
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..engine.types import SamplingParams
from ..errors import PromptError, validation_problem

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


@lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    """A template compiled once per process: compiling it again for every item was 70 s of the 79 s it
    took to build 100k items. Rendering a compiled template has no state, so sharing it is safe."""
    return _ENV.from_string(source)


class PromptHeader(BaseModel):
    """What a prompt file may say about itself; unknown keys are an error (typos would pass silently)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    description: str = ""
    system: str | None = Field(None, description="system text, used only when the model has a chat template")
    mode: Literal["auto", "chat", "completion"] = Field(
        "auto", description="auto: chat when the model has a chat template and the body is not a few-shot completion"
    )
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
    _turns: list[Turn] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_turns(self) -> PromptFile:
        """Turn markers are checked when the file is parsed, so a bad layout fails before any generation."""
        self._turns = _layout_turns(self)
        return self

    def render(self, values: dict[str, Any]) -> str:
        missing = [v for v in self.variables if v not in values]
        if missing:
            flags = " ".join(f"--var {v}=..." for v in missing)
            raise PromptError(f"prompt {self.name} uses {_plural('variable', missing)} not given: {flags}")
        try:
            return _compiled(self.template).render(**values)
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

    @property
    def turns(self) -> list[Turn]:
        """The body's turns ([] for a body without markers); text before the first marker has role 'preamble'."""
        return list(self._turns)

    @property
    def is_fewshot_completion(self) -> bool:
        """Plain text ending in a `Label:` cue that earlier lines show answered (the rule in appliance.chat)."""
        return fewshot_cue(self.template) is not None

    def render_messages(self, values: dict[str, Any]) -> list[dict[str, str]]:
        """Chat messages: the system text, the few-shot turns, the final user turn; variables filled in."""
        body = self.render(values)  # the same variable checks and messages as a completion
        messages: list[dict[str, str]] = []
        if self.header.system is not None:
            system = self._render_part(self.header.system, values).strip()
            if system:
                messages.append({"role": "system", "content": system})
        if not self._turns:
            return [*messages, {"role": "user", "content": body.strip()}]
        preamble = ""
        for turn in self._turns:
            text = self._render_part(turn.template, values).strip()
            if turn.role == "preamble":
                preamble = text
            elif turn.role == "system":
                if text:
                    messages.append({"role": "system", "content": text})
            else:
                if turn.role == "user" and preamble:
                    text, preamble = f"{preamble}\n\n{text}", ""
                messages.append({"role": turn.role, "content": text})
        return messages

    def render_completion(self, values: dict[str, Any]) -> str:
        """Completion text: the rendered body, or for turns the user and assistant texts in order separated
        by blank lines, ending with the final user text (system text left out)."""
        body = self.render(values)
        if not self._turns:
            return body
        texts = [self._render_part(t.template, values).strip() for t in self._turns if t.role != "system"]
        return "\n\n".join(t for t in texts if t)

    def _render_part(self, source: str, values: dict[str, Any]) -> str:
        try:
            return _compiled(source).render(**values)
        except jinja2.TemplateError as exc:
            raise PromptError(f"prompt {self.name}: {exc}") from None
        except Exception as exc:  # errors of the template's own expressions, e.g. {{ name + 1 }}
            raise PromptError(f"prompt {self.name}: template failed: {type(exc).__name__}: {exc}") from None


_TURN_MARKER = re.compile(r"### (system|user|assistant)[ \t]*")
_CUE = re.compile(r"([^\W\d_][^:{}]{0,39}):")


class Turn(NamedTuple):
    role: str  # system | user | assistant | preamble (text before the first marker)
    template: str  # the turn's Jinja2 text
    line: int  # body line (1-based) of the turn's marker; of the first line for the preamble


def split_turns(body: str) -> list[Turn]:
    """The body cut at its turn marker lines; [] when it has none."""
    lines = body.split("\n")
    marks = [(i, m[1]) for i, line in enumerate(lines) if (m := _TURN_MARKER.fullmatch(line.rstrip("\r")))]
    if not marks:
        return []
    turns = []
    if "\n".join(lines[: marks[0][0]]).strip():
        turns.append(Turn("preamble", "\n".join(lines[: marks[0][0]]), 1))
    for k, (i, role) in enumerate(marks):
        end = marks[k + 1][0] if k + 1 < len(marks) else len(lines)
        turns.append(Turn(role, "\n".join(lines[i + 1 : end]), i + 1))
    return turns


def fewshot_cue(body: str) -> str | None:
    """The cue label when `body` is a few-shot completion (see appliance.chat): no turn markers, the last
    non-empty line is `Label:` and an earlier line begins with the same `Label:`; else None."""
    if split_turns(body):
        return None
    lines = [line.strip() for line in body.split("\n") if line.strip()]
    cue = _CUE.fullmatch(lines[-1]) if lines else None
    if cue is None:
        return None
    label = cue[1]
    return label if any(line.startswith(f"{label}:") for line in lines[:-1]) else None


def _body_start(text: str) -> int:
    """Lines before the body: the header and its fences."""
    lines = text.lstrip("\ufeff").split("\n")
    if lines[0].strip() != FENCE:
        return 0
    return next((i + 1 for i in range(1, len(lines)) if lines[i].strip() == FENCE), 0)


def _layout_turns(prompt: PromptFile) -> list[Turn]:
    """Check the order of the body's turns; each turn must parse as a template on its own."""
    turns = split_turns(prompt.template)
    if not turns:
        return []
    where, offset = prompt.path or prompt.name, _body_start(prompt.text)
    expected = "user"
    for k, turn in enumerate(turns):
        at = f"{where}, line {turn.line + offset}"
        if turn.role == "system":
            if any(t.role != "preamble" for t in turns[:k]):
                raise PromptError(f"{at}: '### system' may only be the first turn")
            if prompt.header.system is not None:
                raise PromptError(f"{at}: the system text is given twice, in the header key 'system' and as '### system'")
        elif turn.role != "preamble":
            if turn.role != expected:
                raise PromptError(
                    f"{at}: '### {turn.role}' out of order: after an optional '### system', turns go user, assistant, user, ..."
                )
            expected = "assistant" if expected == "user" else "user"
        if turn.role != "preamble" and not turn.template.strip():
            raise PromptError(f"{at}: the {turn.role} turn is empty")
        try:
            _ENV.parse(turn.template)
        except jinja2.TemplateSyntaxError as exc:
            line = exc.lineno + turn.line + offset - (1 if turn.role == "preamble" else 0)
            raise PromptError(
                f"{where}, line {line}: template error in the {turn.role} turn: {exc.message} "
                "(an {% if %} or {% for %} must open and close within one turn)"
            ) from None
    if expected != "assistant":
        last = next(t for t in reversed(turns) if t.role in ("user", "assistant", "system"))
        raise PromptError(
            f"{where}, line {last.line + offset}: the last turn must be '### user' (the model answers it), not '### {last.role}'"
        )
    return turns


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
        key, msg = validation_problem(exc)
        raise PromptError(f"{where}: header key '{key}': {msg}") from None
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


def sampling_for(prompt: PromptFile, overrides: dict[str, Any]) -> SamplingParams:
    """Engine defaults, overridden by the prompt file's header, overridden by `overrides` (None = unset)."""
    header = prompt.header
    values: dict[str, Any] = {"stop": header.stop}
    for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens"):
        if getattr(header, key) is not None:
            values[key] = getattr(header, key)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**values)


def parse_var(item: str) -> tuple[str, str]:
    """`key=value` from the command line."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise PromptError(f"--var expects key=value with a name for key, got {item!r}")
    return key, value
