"""The appliance from Python: the same library the CLI calls, with typed arguments and results.

    from appliance import Appliance

    with Appliance("appliance.db") as app:
        result = app.generate("prompts/product-review.md", "gemma-3-270m-q4_k_m", n=4, max_tokens=48)
        summary = app.run("tasks/smart-home.toml")
        app.export(summary.run_id, "smart-home.jsonl")
        app.evaluate("gemma-3-270m-q4_k_m", summary.run_id)

Nothing here touches the process as a whole: the offline guard is armed only for the length of each
call, and only with `offline=True` (the `appliance` command arms it for its whole process); no signal
handler is installed. Errors are `appliance.errors.ApplianceError` subclasses with one-line messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import offline as _offline
from .launch import run_file
from .runs.summary import RunSummary
from .tasks.evaluate import EvalResult, evaluate
from .events import RunEvents
from .export import ExportResult, export_run
from .runs.generate import GenerateOptions, GenerateResult, generate
from .models.registry import ModelRecord, Registry
from .prompts.files import load_prompt
from .prompts.schema import load_json_schema
from .store import Store, default_db_path


class Appliance:
    """One database and its model registry. Not thread-safe: one per thread."""

    def __init__(self, db: str | Path | None = None, *, offline: bool = False, events: RunEvents | None = None) -> None:
        self.store = Store(db if db is not None else default_db_path())
        self.registry = Registry(self.store)
        self.offline = offline
        self.events = events

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        if self.offline:
            with _offline.armed():
                yield
        else:
            yield

    # -- models -------------------------------------------------------------------------------
    def models(self) -> list[ModelRecord]:
        with self._call():
            return self.registry.list()

    def add_model(self, path: str | Path, name: str | None = None) -> ModelRecord:
        with self._call():
            record = self.registry.register(Path(path), name=name, origin="added")
            self.registry.ensure_sha256(record)
            return record

    # -- making data --------------------------------------------------------------------------
    def generate(
        self,
        prompt_file: str | Path,
        model: str,
        n: int = 1,
        *,
        variables: dict[str, Any] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        json_schema: str | Path | None = None,
        mode: str | None = None,
        chat_template: str | None = None,
        parallel: int | None = None,
    ) -> GenerateResult:
        """`appliance generate`: `n` outputs of a prompt file, each logged; the outputs are the run's
        generations (`outputs(result.run_id)`)."""
        with self._call():
            opts = GenerateOptions(count=n, variables=variables or {}, temperature=temperature, top_p=top_p,
                                   max_tokens=max_tokens, seed=seed, n_parallel=parallel, mode=mode, chat_template=chat_template)
            schema = load_json_schema(json_schema) if json_schema else None
            return generate(self.store, self.registry, load_prompt(prompt_file), model, opts, schema=schema,
                            command=["(python api)"], events=self.events)

    def run(
        self,
        file: str | Path,
        *,
        resume: int | None = None,
        new_run: bool = False,
        parallel: int | None = None,
        mode: str | None = None,
        chat_template: str | None = None,
        ray: str | None = None,
        ray_actors: int | None = None,
    ) -> RunSummary:
        """`appliance run`: a recipe or a task spec; running the same file again continues its unfinished run.
        `ray` (local, auto, HOST:PORT, ray://HOST:PORT) spreads the generation over a Ray cluster's actors."""
        with self._call():
            return run_file(self.store, self.registry, file, ray=ray, ray_actors=ray_actors, resume=resume,
                            new_run=new_run, n_parallel=parallel, mode=mode, chat_template=chat_template, events=self.events)

    def export(self, run_id: int, out: str | Path, *, format: str = "openai", split: str | None = None,
               seed: int = 0, resplit: bool = False, force: bool = False) -> ExportResult:
        """`appliance export`: the run's kept examples in a fine-tuning format, one file per split (a task
        run's stored splits as stored), with a dataset card; files that exist are refused unless `force`."""
        with self._call():
            return export_run(self.store, run_id, format, Path(out), split, seed, resplit=resplit, force=force)

    def evaluate(self, student: str, dataset_run: int, *, split: str = "test", mode: str = "auto",
                 chat_template: str | None = None, parallel: int | None = None) -> EvalResult:
        """`appliance eval`: a student GGUF scored on a task run's held-out split."""
        with self._call():
            return evaluate(self.store, self.registry, student, dataset_run, split, n_parallel=parallel, mode=mode,
                            chat_template=chat_template, events=self.events)

    # -- reading ------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        from .runs.queries import list_runs

        return list_runs(self.store, limit=0)

    def outputs(self, run_id: int) -> list[dict[str, Any]]:
        """A run's generations, in item order."""
        return self.store.rows("SELECT * FROM generations WHERE run_id = ? ORDER BY item_index", [run_id])

    def examples(self, run_id: int, kept: bool = True) -> list[dict[str, Any]]:
        return self.store.rows("SELECT * FROM examples WHERE run_id = ? AND kept = ? ORDER BY id", [run_id, int(kept)])

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Appliance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
