"""The CLI's view of a run: a progress bar (outputs done, completion tokens/s, ETA) and, for `generate` and `run -v`, each output as text.

`GenerationProgress` is the CLI's `RunEvents`: every run kind reports to it the same way. Outputs go
to stdout as they complete (above the bar on a terminal); the bar is drawn on stderr, only when stderr
is a terminal. A run with several stages (task rounds, answers after inputs) grows the bar's total.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from ..events import RunEvents


class _TokensPerSecond(ProgressColumn):
    def __init__(self, owner: "GenerationProgress") -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: Task) -> Text:
        return Text(f"{self.owner.rate():6.1f} tok/s", style="progress.data.speed")


def text_row(row: dict[str, Any]) -> str:
    """An output as `generate` and `run` print it: a header line naming the item, then the text."""
    from ..runs.queries import item_label

    label = item_label(row["item_index"], json.loads(row.get("variables_json") or "null"))
    return f"--- {label} seed {row['seed']} ({row['tokens_out']} tokens, {row['finish_reason']})\n" + row["output"].strip("\n")


def json_row(row: dict[str, Any]) -> str:
    out = {k: row[k] for k in ("run_id", "item_index", "seed", "output", "finish_reason", "tokens_in", "tokens_out", "ms")}
    return json.dumps(out, ensure_ascii=False)


class GenerationProgress(RunEvents):
    def __init__(self, show: Callable[[dict[str, Any]], str] | None = None, describe: str = "generating") -> None:
        self.show = show  # how to print each output (None: not at all)
        self.describe = describe
        self.total = 0
        self.n_tokens = 0
        self.started = 0.0
        self.console = Console(file=sys.stderr)
        self.enabled = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None

    # -- RunEvents ----------------------------------------------------------------------------
    def planned(self, plan: Any, prefix_tokens: int, n_items: int) -> None:
        note = (f"{n_items} items, {plan.n_parallel} parallel, ctx {plan.n_ctx}, {plan.n_gpu_layers} GPU layers, "
                f"{prefix_tokens} shared prompt tokens")
        if self._progress is None and not self.started:
            for line in getattr(plan, "adjustments", []):  # every value the planner changed from what was asked, and why
                click.echo(f"note: {line}", err=True)
            self.start(note, n_items)
        elif self._progress is None:
            self.total += n_items
        else:
            self.total += n_items
            self._progress.update(self._task, total=self.total)

    def row(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)
        if self.show is not None:
            print(self.show(row), flush=True)

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        if self._progress is not None:
            self._progress.refresh()

    def warning(self, message: str) -> None:
        click.echo(f"warning: {message}", err=True)  # one line, never wrapped: people grep for these

    # -- the bar ------------------------------------------------------------------------------
    def start(self, description: str, total: int) -> None:
        self.stop()  # a run's later phases (retries, checks) start a bar of their own
        self.total = total
        self.started = time.perf_counter()
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn(f"[bold]{self.describe}"),
            BarColumn(),
            MofNCompleteColumn(),
            _TokensPerSecond(self),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            redirect_stdout=sys.stdout.isatty(),  # outputs printed to a terminal appear above the bar
            redirect_stderr=False,
        )
        self._progress.start()
        self.console.print(f"[dim]{description}[/dim]")
        self._task = self._progress.add_task("generate", total=self.total)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        return self.n_tokens / elapsed if elapsed > 0 else 0.0

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "GenerationProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
