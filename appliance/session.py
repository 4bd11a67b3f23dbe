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
reason; Ctrl-C becomes `RunInterrupted` with the command that continues the run). The model is loaded once, on the first `generate`, and reused by every later stage; a stage
that could not fit one sequence in the loaded context reloads it (each load is recorded in the run's
events with its time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .engine import Engine
from .generation import Request, SamplingParams
from .llama import count_prompt_tokens
from .errors import ApplianceError, RunInterrupted
from .events import RunEvents
from .hardware import detect_hardware
from .logs import interrupted_message
from .models import ModelRecord
from .planner import Plan, make_plan
from .runner import Execution, Item, pending, row_for
from .store import Store, Writer

Workload = tuple[Sequence[str], SamplingParams]


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
    ) -> None:
        self.store, self.record = store, record
        self.events = events or RunEvents()
        self.n_parallel, self.n_ctx, self.n_gpu_layers = n_parallel, n_ctx, n_gpu_layers
        self.run_id: int | None = None
        self.plan: Plan | None = None
        self.prefix_tokens = 0
        self.engine: Engine | None = None
        self.loads = 0
        self.load_seconds = 0.0
        self._completed = False

    # -- planning -----------------------------------------------------------------------------
    def prepare(self, workloads: Sequence[Workload]) -> Plan:
        """Plan once for every stage the run will have: the longest shared prefix and the longest
        per-sequence need among the workloads, so each stage runs at the plan's full parallelism.
        Refused (PlanError) before anything is loaded when it does not fit."""
        prefix, seq, n_max = 0, 1, 1
        for prompts, params in workloads:
            if not prompts:
                continue
            p, s = count_prompt_tokens(self.record.path, list(prompts))
            prefix, seq, n_max = max(prefix, p), max(seq, s + params.max_tokens), max(n_max, len(prompts))
        plan = make_plan(
            self.record.info, detect_hardware(), n_ctx=self.n_ctx, n_parallel=self.n_parallel,
            n_gpu_layers=self.n_gpu_layers, prefix_tokens=prefix, seq_tokens=seq, max_parallel=n_max,
        )
        plan.require()
        self.plan, self.prefix_tokens = plan, prefix
        return plan

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
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # -- generation ---------------------------------------------------------------------------
    def _engine_for(self, items: list[Item], params: SamplingParams) -> Engine:
        """The loaded engine, loading it (or reloading it with a larger plan) when needed."""
        if self.plan is None:
            self.prepare([([it.prompt for it in items], params)])
        if self.engine is not None:
            longest = max(len(self.engine.tokenize(it.prompt)) for it in items)
            if longest + _max_tokens(items, params) <= self.engine.n_ctx:
                return self.engine
            self.close()
            self.plan = None
            self.prepare([([it.prompt for it in items], params)])
        assert self.plan is not None
        start = time.perf_counter()
        self.engine = Engine(self.record.path, self.plan)
        seconds = time.perf_counter() - start
        self.loads += 1
        self.load_seconds += seconds
        self.event("info", f"model {self.record.name} loaded in {seconds:.2f} s (load {self.loads} of this session; "
                           f"ctx {self.plan.n_ctx}, parallel {self.plan.n_parallel}, gpu layers {self.plan.n_gpu_layers})")
        self.events.loaded(seconds)
        return self.engine

    def generate(self, items: list[Item], params: SamplingParams, *, prompt_id: int | None = None,
                 grammar: Any = None) -> Execution:
        """Generate every item the run has not stored yet; each row is written the moment it completes."""
        if self.run_id is None:
            raise ApplianceError("internal: RunSession.generate before begin/attach")
        todo = pending(self.store, self.run_id, items)
        start = time.perf_counter()
        if not todo:
            return Execution(0, 0, 0.0, 0.0, [])
        self.events.planned(self.plan, self.prefix_tokens, len(todo))
        engine = self._engine_for(todo, params)
        writer = Writer(self.store.path)
        tokens = 0
        retries_before = len(engine.stats.retries)
        try:
            requests = [_request(it, grammar) for it in todo]
            by_index = {it.index: it for it in todo}
            for done in engine.generate(requests, params, on_step=self.events.tokens):
                row = row_for(self.run_id, prompt_id, by_index[done.key], done)
                writer.put(row)
                tokens += done.tokens_out
                self.events.row(row)
        finally:
            stats = writer.close()
        retries = engine.stats.retries[retries_before:]
        for message in retries:
            self.event("warning", message)
        return Execution(stats.rows, tokens, time.perf_counter() - start, stats.seconds, retries)


def _max_tokens(items: list[Item], params: SamplingParams) -> int:
    return max([params.max_tokens] + [it.params.max_tokens for it in items if it.params is not None])


def _request(item: Item, grammar: Any) -> Request:
    return Request(key=item.index, prompt=item.prompt, seed=item.seed, grammar=item.grammar or grammar,
                   params=item.params, add_bos=item.add_bos)
