"""A run session: the one owner of a run's status and of its engine, from the run's start to its end.

Every command that generates (generate, the three recipe kinds, task specs, eval) runs inside one
session:

    with RunSession(store, record, events=...) as session:
        session.prepare([(prompts, params), ...])      # plan once, for every stage the run will have
        run_id = session.begin(kind=..., ...)          # or session.attach(run_id) to continue one
        session.generate(items, params)                # as many stages, rounds and tasks as needed
        session.complete()

Status transitions each happen in exactly one place: `begin`/`attach` (running), `complete`
(completed), and `__exit__` (interrupted on Ctrl-C/SIGTERM, failed on any other exception, with the
reason; Ctrl-C becomes `RunInterrupted` with the command that continues the run).

The session's workers generate: a `worker.ModelWorker` in this process, or (`run --ray`) one per Ray
actor (`cluster.RayWorkers`). Either loads the model once, on the first `generate`, and reuses it for
every later stage; a stage that could not fit one sequence in the loaded context reloads it (each load
is recorded in the run's events with its time and where it ran). A later stage may need another model
(a rubric judge that is not the run's model): `use_model` releases the loaded one and plans the other,
which loads on the next `generate` (the switch and the load are run events; `loads` counts both).
Rows are written here, by this process's one writer, whatever generated them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import ApplianceError, RunInterrupted
from ..events import RunEvents
from ..engine.types import Request, SamplingParams
from .queries import interrupted_message
from ..models.registry import ModelRecord
from ..plan.planner import Plan
from .items import Execution, Item, pending, row_for
from ..store import Store, Writer
from ..workers.local import Limits, ModelWorker, Needs, needs_for

Workload = tuple[Sequence[str], SamplingParams]


class Workers(Protocol):
    """Where a session's requests are generated: a `ModelWorker` in this process, or a cluster's
    actors (`appliance.cluster`); both plan, stream the same notices and count their model loads."""

    loads: int
    load_seconds: float

    def prepare(self, needs: Needs) -> Plan: ...
    def stream(self, requests: list[Request], params: SamplingParams) -> Any: ...
    def close(self) -> None: ...


class RunSession:
    def __init__(
        self,
        store: Store,
        record: ModelRecord,
        *,
        events: RunEvents | None = None,
        n_parallel: int | None = None,
        n_ctx: int | None = None,
        n_gpu_layers: int | None = None,
        cluster: Any = None,
    ) -> None:
        self.store, self.record = store, record
        self.events = events or RunEvents()
        self._limits, self._cluster = Limits(n_parallel=n_parallel, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers), cluster
        self.workers: Workers = self._workers_for(record)
        self._earlier_loads, self._earlier_load_seconds = 0, 0.0  # of the models this session used before (`use_model`)
        self.run_id: int | None = None
        self.plan: Plan | None = None
        self.prefix_tokens = 0
        self._completed = False

    def _workers_for(self, record: ModelRecord) -> Workers:
        if self._cluster is not None:
            return self._cluster.workers(record, self._limits)
        return ModelWorker(record.path, record.info, self._limits)

    @property
    def loads(self) -> int:
        return self._earlier_loads + self.workers.loads

    @property
    def load_seconds(self) -> float:
        return self._earlier_load_seconds + self.workers.load_seconds

    def use_model(self, record: ModelRecord, workloads: Sequence[Workload]) -> Plan:
        """Generate the next stages with another model (a judge that is not the run's model): the current
        one is released, the new one planned for `workloads` and loaded on the next `generate`; the switch
        and the load are recorded in the run's events."""
        self._earlier_loads, self._earlier_load_seconds = self.loads, self.load_seconds
        self.workers.close()
        previous, self.record = self.record.name, record
        self.workers, self.plan = self._workers_for(record), None
        self.event("info", f"switching model: {previous} -> {record.name}")
        return self.prepare(workloads)

    # -- planning -----------------------------------------------------------------------------
    def prepare(self, workloads: Sequence[Workload]) -> Plan:
        """Plan once for every stage the run will have: the longest shared prefix and the longest
        per-sequence need among the workloads, so each stage runs at the plan's full parallelism.
        Refused (PlanError) before anything is loaded when it does not fit."""
        needs = needs_for(self.record.path, workloads)
        self.plan, self.prefix_tokens = self.workers.prepare(needs), needs.prefix_tokens
        return self.plan

    # -- status -------------------------------------------------------------------------------
    def begin(self, **fields: Any) -> int:
        """Write the run's row (status running) and return its id."""
        if self.plan is not None:
            fields.setdefault("plan", self.plan.model_dump())
        self.run_id = self.store.start_run(**fields)
        return self.run_id

    def attach(self, run_id: int) -> int:
        """Continue an existing run: it is running again until this session ends it."""
        self.run_id = run_id
        self.store.update("runs", run_id, {"status": "running", "ended_at": None, "error": None})
        return run_id

    def complete(self) -> None:
        if self.run_id is not None:
            self.store.finish_run(self.run_id, "completed")
        self._completed = True

    def event(self, level: str, message: str) -> None:
        if self.run_id is not None:
            self.store.event(self.run_id, level, message)
        if level == "warning":
            self.events.warning(message)

    def __enter__(self) -> "RunSession":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.run_id is not None and exc_type is not None and not self._completed:
                if issubclass(exc_type, KeyboardInterrupt):
                    self.store.finish_run(self.run_id, "interrupted", "stopped by a signal")  # `runs` shows how to continue it
                    if not isinstance(exc, RunInterrupted):
                        raise RunInterrupted(self.run_id, interrupted_message(self.store, self.run_id)) from None
                else:
                    self.store.finish_run(self.run_id, "failed", str(exc) or exc_type.__name__)
        finally:
            self.close()

    def close(self) -> None:
        self.workers.close()

    # -- generation ---------------------------------------------------------------------------
    def generate(self, items: list[Item], params: SamplingParams, *, prompt_id: int | None = None,
                 grammar: Any = None) -> Execution:
        """Generate every item the run has not stored yet; each row is written the moment it completes."""
        if self.run_id is None:
            raise ApplianceError("internal: RunSession.generate before begin/attach")
        todo = pending(self.store, self.run_id, items)
        start = time.perf_counter()
        if not todo:
            return Execution(0, 0, 0.0, 0.0, [])
        if self.plan is None:
            self.prepare([([it.prompt for it in todo], params)])
        self.events.planned(self.plan, self.prefix_tokens, len(todo))
        writer = Writer(self.store.path)
        tokens, warnings = 0, []
        by_index = {it.index: it for it in todo}
        try:
            for kind, payload in self.workers.stream([_request(it, grammar) for it in todo], params):
                tokens += self._notice(kind, payload, writer, prompt_id, by_index, warnings)
        finally:
            stats = writer.close()
        return Execution(stats.rows, tokens, time.perf_counter() - start, stats.seconds, warnings)

    def _notice(self, kind: str, payload: Any, writer: Writer, prompt_id: int | None, by_index: dict[int, Item],
                warnings: list[str]) -> int:
        """Act on one worker notice (see `appliance.worker`); the completion tokens it stored."""
        if kind == "done":
            row = row_for(self.run_id, prompt_id, by_index[payload.key], payload)
            writer.put(row)
            self.events.row(row)
            return payload.tokens_out
        if kind == "tokens":
            self.events.tokens(payload)
        elif kind == "loaded":
            self.event("info", replace(payload, loads=self.loads).message(self.record.name))
            self.events.loaded(payload.seconds)
        elif kind == "warning":
            self.event("warning", payload)
            warnings.append(payload)
        elif kind == "info":
            self.event("info", payload)
        return 0


def _request(item: Item, grammar: Any) -> Request:
    return Request(key=item.index, prompt=item.prompt, seed=item.seed, grammar=item.grammar or grammar,
                   params=item.params, add_bos=item.add_bos)
