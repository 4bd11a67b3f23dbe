"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from typing import Any


def first_line(message: Any) -> str:
    """A library's multi-line message (source echo, caret, traceback) as one line: its first line, and its
    last where the first only introduces it ("regex parse error:")."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def validation_problem(exc: Any) -> tuple[str, str]:
    """(key path, message) of a pydantic ValidationError's first error, in words for people: a key the
    model does not know is an "unknown key", a missing one "is missing"."""
    err = exc.errors()[0]
    key = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return key, "unknown key"
    if err["type"] == "missing":
        return key, "is missing"
    return key, err["msg"].removeprefix("Value error, ")


class ApplianceError(Exception):
    """A problem the user can fix; its message is one line, shown as `Error: <message>`."""

    exit_code = 1


class ModelFileError(ApplianceError):
    """A model file that is missing, unreadable, not GGUF, or truncated."""


class PlanError(ApplianceError):
    """The model does not fit this machine with the requested settings."""


class StoreError(ApplianceError):
    """The database cannot be opened or written."""


class PromptError(ApplianceError):
    """A prompt file that cannot be parsed or rendered."""


class GenerationError(ApplianceError):
    """llama.cpp failed while loading or decoding."""


class ChatTemplateError(ApplianceError):
    """A chat template that is missing, unknown, unreadable, refuses the conversation or misbehaves."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # raised | security | syntax | error | timeout | output | memory | crash | config


class ResumeError(ApplianceError):
    """A run cannot be continued as asked (its recipe, prompt, mode or chat template changed)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run after it was marked interrupted; `message` says which run, what it
    kept and the exact command that continues it (a KeyboardInterrupt still, so every cleanup runs)."""

    def __init__(self, run_id: int, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.message = message


def with_article(word: str) -> str:
    """'a generate', 'an eval': the indefinite article by the word's first letter (enough for our words)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
