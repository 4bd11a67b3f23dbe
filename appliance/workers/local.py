"""One model on one machine: plans against that machine, loads the model once, reloads it only when a
stage needs a longer context, and streams what happens as notices.

`RunSession` drives a `ModelWorker` in its own process; on a Ray cluster (`cluster.py`) each actor
holds one, planning against its own node's RAM/VRAM and CPUs. Either way the session sees the same
stream of notices, one `(kind, payload)` tuple at a time:

    ("loaded", Loaded)        the model was (re)loaded
    ("tokens", int)           completion tokens decoded since the last notice
    ("done", Completion)      one request finished
    ("warning", str)          something the run's events should keep (e.g. a decode retried smaller)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.engine import Engine
from ..engine.types import Request, SamplingParams
from ..models.gguf import GGUFInfo
from ..plan.hardware import HardwareInfo, detect_hardware
from ..engine.llama import count_prompt_tokens, prompt_shapes
from ..plan.planner import Plan, make_plan

Notice = tuple[str, Any]


@dataclass(frozen=True)
class Needs:
    """What a run's stages need of the context: the shared prompt prefix, the longest sequence
    (prompt remainder + new tokens) and the most sequences worth decoding together."""

    prefix_tokens: int = 0
    seq_tokens: int = 1
    max_parallel: int = 1

    def merge(self, other: Needs) -> Needs:
        return Needs(max(self.prefix_tokens, other.prefix_tokens), max(self.seq_tokens, other.seq_tokens),
                     max(self.max_parallel, other.max_parallel))


@dataclass(frozen=True)
class Limits:
    """The user's settings (None: the planner chooses) and this worker's share of its machine."""

    n_parallel: int | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None  # None: every physical core this process may use
    memory_share: float = 1.0  # the fraction of the machine's free RAM/VRAM this worker may plan with
    gpu_ids: tuple[int, ...] | None = None  # the GPUs this worker may use (None: all the machine has)


@dataclass(frozen=True)
class Loaded:
    seconds: float
    plan: Plan
    loads: int  # loads of this worker so far, this one included
    where: str = ""  # the machine (and actor), on a cluster

    def message(self, model: str) -> str:
        on = f" on {self.where}" if self.where else ""
        return (f"model {model} loaded{on} in {self.seconds:.2f} s (load {self.loads} of this session; "
                f"ctx {self.plan.n_ctx}, parallel {self.plan.n_parallel}, gpu layers {self.plan.n_gpu_layers}, "
                f"threads {self.plan.n_threads})")


def needs_for(model_path: str, workloads: Sequence[tuple[Sequence[str], SamplingParams]]) -> Needs:
    """The needs of every workload (prompts, their sampling settings) together."""
    needs = Needs()
    work = [(list(prompts), params) for prompts, params in workloads if prompts]
    if not work:
        return needs
    for (prefix, rest), (prompts, params) in zip(prompt_shapes(model_path, [p for p, _ in work]), work):
        needs = needs.merge(Needs(prefix, rest + params.max_tokens, len(prompts)))
    return needs


class ModelWorker:
    def __init__(self, path: str, info: GGUFInfo, limits: Limits | None = None, *, where: str = "") -> None:
        self.path, self.info, self.where = path, info, where
        self.limits = limits or Limits()
        self.needs = Needs()
        self.plan: Plan | None = None
        self.engine: Engine | None = None
        self.loads = 0
        self.load_seconds = 0.0

    def hardware(self) -> HardwareInfo:
        """This machine as this worker may use it: its share of free memory, its GPUs."""
        hw = detect_hardware()
        share, gpu_ids = self.limits.memory_share, self.limits.gpu_ids
        if share >= 1.0 and gpu_ids is None:
            return hw
        gpus = [g for g in hw.gpus if gpu_ids is None or g.index in gpu_ids]
        if share < 1.0:
            gpus = [g.model_copy(update={"vram_free_bytes": int(g.vram_free_bytes * share)}) for g in gpus]
        return hw.model_copy(update={"effective_available_bytes": int(hw.effective_available_bytes * share), "gpus": gpus})

    def prepare(self, needs: Needs) -> Plan:
        """Plan for `needs` (with what was planned before) on this machine; PlanError when it does not fit."""
        self.needs = self.needs.merge(needs)
        lim = self.limits
        plan = make_plan(self.info, self.hardware(), n_ctx=lim.n_ctx, n_parallel=lim.n_parallel,
                         n_gpu_layers=lim.n_gpu_layers, n_threads=lim.n_threads, prefix_tokens=self.needs.prefix_tokens,
                         seq_tokens=self.needs.seq_tokens, max_parallel=self.needs.max_parallel)
        self.plan = plan.require()
        return self.plan

    def stream(self, requests: list[Request], params: SamplingParams) -> Iterator[Notice]:
        """Generate every request, loading the model first when needed; see the module's notices."""
        if not requests:
            return
        engine = yield from self._engine_for(requests, params)
        produced = 0

        def on_step(n: int) -> None:
            nonlocal produced
            produced += n

        retries_before = len(engine.stats.retries)
        for done in engine.generate(requests, params, on_step=on_step):
            if produced:
                yield "tokens", produced
                produced = 0
            yield "done", done
        for message in engine.stats.retries[retries_before:]:
            yield "warning", message

    def _engine_for(self, requests: list[Request], params: SamplingParams) -> Iterator[Notice]:
        """The loaded engine (a generator: yields the "loaded" notice), reloaded with a larger plan when
        a request cannot fit one sequence in the loaded context."""
        longest_new = max([params.max_tokens] + [r.params.max_tokens for r in requests if r.params is not None])
        if self.engine is not None:
            longest = max(len(self.engine.tokenize(r.prompt, add_bos=r.add_bos)) for r in requests)
            if longest + longest_new <= self.engine.n_ctx:
                return self.engine
            self.close()
            self.plan = None
        if self.plan is None:
            prefix, rest = count_prompt_tokens(self.path, [r.prompt for r in requests])
            self.prepare(Needs(prefix, rest + longest_new, len(requests)))
        assert self.plan is not None
        start = time.perf_counter()
        self.engine = Engine(self.path, self.plan)
        seconds = time.perf_counter() - start
        self.loads += 1
        self.load_seconds += seconds
        yield "loaded", Loaded(seconds, self.plan, self.loads, self.where)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
