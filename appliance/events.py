"""What a run tells whoever watches it: one interface for every run kind (generate, recipes, task specs,
eval), used by the CLI's progress bar, the Python API and tests.

Subclass `RunEvents` and override what you need; every method does nothing by default.
"""

from __future__ import annotations

from typing import Any


class RunEvents:
    def planned(self, plan: Any, prefix_tokens: int, n_items: int) -> None:
        """A stage is about to generate `n_items` items with `plan` (`prefix_tokens` shared prompt tokens)."""

    def loaded(self, seconds: float) -> None:
        """The model was loaded (once per run, unless a stage needed a larger context)."""

    def row(self, row: dict[str, Any]) -> None:
        """A generation was completed and handed to the writer (a `generations` row)."""

    def tokens(self, n: int) -> None:
        """A decode step produced `n` completion tokens (for tokens/s)."""

    def warning(self, message: str) -> None:
        """Something the user should know (a skipped source, a decode retry, a label short of its target)."""


class Recorder(RunEvents):
    """Keeps everything it is told: for tests and notebooks."""

    def __init__(self) -> None:
        self.plans: list[tuple[Any, int, int]] = []
        self.loads: list[float] = []
        self.rows: list[dict[str, Any]] = []
        self.n_tokens = 0
        self.warnings: list[str] = []

    def planned(self, plan: Any, prefix_tokens: int, n_items: int) -> None:
        self.plans.append((plan, prefix_tokens, n_items))

    def loaded(self, seconds: float) -> None:
        self.loads.append(seconds)

    def row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def tokens(self, n: int) -> None:
        self.n_tokens += n

    def warning(self, message: str) -> None:
        self.warnings.append(message)
