"""The progress bar for long generations: outputs done, completion tokens/s, ETA (terminal only).

Outputs go to stdout as they complete (above the bar on a terminal); the bar is drawn on stderr, only
when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


class _TokensPerSecond(ProgressColumn):
    def __init__(self, owner: "GenerationProgress") -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: Task) -> Text:
        return Text(f"{self.owner.rate():6.1f} tok/s", style="progress.data.speed")


class GenerationProgress:
    def __init__(self) -> None:
        self.total = 0
        self.n_tokens = 0
        self.started = 0.0
        self.console = Console(file=sys.stderr)
        self.enabled = self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        self.stop()  # a run's later phases (retries, checks) start a bar of their own
        self.total = total
        self.started = time.perf_counter()
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]generating"),
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

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        if self._progress is not None:
            self._progress.refresh()

    def advance(self, _tokens_out: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def print(self, text: str) -> None:
        print(text, flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
