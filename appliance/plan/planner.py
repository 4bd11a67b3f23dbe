"""The memory plan: will this model run here, and with which llama.cpp settings.

A plan is made from a GGUF header (`GGUFInfo`) and this machine (`HardwareInfo`) before anything is
loaded. It chooses the context size, the number of parallel sequences, the GPU layers and the
threads, estimates the memory llama.cpp will take for them, and says whether that fits; when it does
not, it searches for the largest smaller context and parallelism that do, and says so.

The engine runs ONE llama.cpp context with a unified KV cache (`kv_unified`): every sequence draws
cells from the same pool, so a shared prompt prefix decoded once and copied to each sequence
(`llama_memory_seq_cp`) occupies its cells once. `n_seq_max` is `n_parallel + 1`: the extra sequence
holds that prefix. `Plan.context_params()` and `Plan.model_params()` are the llama.cpp parameters the
estimate assumes; the engine applies them as they are.

The estimate itself (what each term counts, and why) is `appliance.estimate`. A plan fits when the
estimate leaves a margin free: 10% of the available RAM or 512 MiB, whichever is larger; on a GPU,
1 GiB or 10% of its memory, whichever is smaller (llama.cpp's own fitter keeps 1 GiB per device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGMLQuantizationType
from pydantic import BaseModel, Field

from ..errors import PlanError
from .estimate import (
    CTX_PAD,
    check_kv_types,
    FLOAT_TYPES,
    Estimate,
    GiB,
    MiB,
    Settings,
    estimate_memory,
    format_bytes,
    layer_count,
    pad_ctx,
)
from ..models.info import GGUFInfo
from .hardware import GPUInfo, HardwareInfo

DEFAULT_CTX = 4096
MAX_SEQ = 256  # LLAMA_MAX_SEQ: sequences one context can hold
CPU_PARALLEL = (16, 8, 4, 2, 1)  # 16 measured best on CPU (docs/benchmarks.md)
GPU_PARALLEL = (64, 32, 16, 8, 4, 2, 1)
RAM_MARGIN_FRACTION, RAM_MARGIN_MIN = 0.10, 512 * MiB
GPU_MARGIN_FRACTION, GPU_MARGIN_MAX = 0.10, 1 * GiB

# Bits per weight of llama.cpp's quantization mixes, from the sizes `llama-quantize` lists for
# Llama-3-8B (tools/quantize/quantize.cpp): size in GiB * 8 / 8.03e9 parameters.
_QUANT_BPW: dict[str, float] = {
    "Q8_0": 8.52,
    "Q6_K": 6.57,
    "Q5_K_M": 5.70,
    "Q4_K_M": 4.90,
    "Q3_K_M": 4.00,
    "Q2_K": 3.17,
}



class Plan(BaseModel):
    """Settings for one llama.cpp context and the memory they take here."""

    fits: bool
    verdict: str = Field(description="one line: fits or not, with the figures")
    suggestions: list[str] = Field(default_factory=list, description="settings that would fit, best first")
    adjustments: list[str] = Field(
        default_factory=list, description="each value asked for that the plan changed or risks, and why ('parallel 100000 -> 255: ...')"
    )

    n_ctx: int = Field(description="KV cells of full-attention layers, shared by all sequences (multiple of 256)")
    n_parallel: int = Field(description="sequences generated at once")
    n_seq_max: int = Field(description="n_parallel + 1: one more sequence holds the shared prompt prefix")
    n_outputs_max: int = Field(description="logit rows one decode may ask for (one per sequence)")
    n_gpu_layers: int = Field(description="layers on the GPU; the output layer counts as one and goes first")
    n_threads: int
    n_batch: int
    n_ubatch: int
    swa_full: bool = Field(description="sliding-window layers keep every cell (needed to reuse a long prefix)")
    flash_attn: bool
    type_k: str
    type_v: str
    kv_swa_cells: int | None = Field(None, description="KV cells of sliding-window layers; None without them")

    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    other_bytes: int = Field(description="output buffer, vocabulary, CPU work buffer, Python runtime")
    total_bytes: int
    cpu_bytes: int = Field(description="what must fit in RAM")
    gpu_bytes: int = Field(description="what must fit in GPU memory")
    available_bytes: int = Field(description="RAM available to this process (cgroup limit applied)")
    margin_bytes: int
    gpu_available_bytes: int | None = Field(None, description="free memory of the GPU used; None without one")
    gpu_margin_bytes: int | None = None

    def require(self) -> Plan:
        """This plan when it fits; PlanError with the figures and the best suggestion when not."""
        if self.fits:
            return self
        hint = f"; {self.suggestions[0]}" if self.suggestions else ""
        raise PlanError(f"the model {self.verdict}{hint}")

    def model_params(self) -> dict[str, int]:
        """Fields of llama_model_params this plan assumes."""
        return {"n_gpu_layers": self.n_gpu_layers}

    def context_params(self) -> dict[str, int | bool]:
        """Fields of llama_context_params this plan assumes (flash_attn_type: 1 enabled, 0 disabled)."""
        return {
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "n_seq_max": self.n_seq_max,
            "n_outputs_max": self.n_outputs_max,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads,
            "kv_unified": True,
            "swa_full": self.swa_full,
            "flash_attn_type": 1 if self.flash_attn else 0,
            "type_k": int(GGMLQuantizationType[self.type_k.upper()]),
            "type_v": int(GGMLQuantizationType[self.type_v.upper()]),
        }


@dataclass(frozen=True)
class _Budget:
    ram: int
    ram_margin: int
    gpu: GPUInfo | None

    @property
    def gpu_margin(self) -> int:
        return min(GPU_MARGIN_MAX, int(self.gpu.vram_total_bytes * GPU_MARGIN_FRACTION)) if self.gpu else 0

    def ram_need(self, est: Estimate) -> int:
        # Metal's GPU memory is the same RAM: both sides draw on it.
        return est.cpu + (est.gpu if self.gpu and self.gpu.backend == "metal" else 0)

    def ram_fits(self, est: Estimate) -> bool:
        return self.ram_need(est) <= self.ram - self.ram_margin

    def gpu_fits(self, est: Estimate) -> bool:
        if est.gpu == 0:
            return True
        return self.gpu is not None and est.gpu <= self.gpu.vram_free_bytes - self.gpu_margin

    def fits(self, est: Estimate) -> bool:
        return self.ram_fits(est) and self.gpu_fits(est)


def make_plan(
    info: GGUFInfo,
    hw: HardwareInfo,
    *,
    n_ctx: int | None = None,
    n_parallel: int | None = None,
    n_gpu_layers: int | None = None,
    n_threads: int | None = None,
    prefix_tokens: int | None = None,
    seq_tokens: int | None = None,
    max_parallel: int | None = None,
    n_batch: int = 512,
    n_ubatch: int = 512,
    type_k: str = "f16",
    type_v: str = "f16",
    swa_full: bool | None = None,
    flash_attn: bool | None = None,
    allow_long_context: bool = False,
) -> Plan:
    """Choose settings for `info` on `hw` and estimate their memory; never raises for "does not fit".

    n_ctx: total KV cells (None: prefix_tokens + n_parallel * seq_tokens when the workload is known,
    else min(trained context, 4096)). n_parallel: None chooses the largest of 16/8/4/2/1 (64 down
    to 1 with GPU layers) that fits, at most max_parallel (e.g. the number of requests) and, when
    the workload is unknown, at most one sequence per 256 cells of context.
    n_gpu_layers: None as many as fit the first GPU's free memory, -1 all, else that many (the
    output layer counts as one). swa_full: None turns it on when a sequence of the known workload
    is longer than the model's sliding window. flash_attn: None uses it when layers are on a GPU or
    the V cache is quantized (llama.cpp requires it then); it was slower on the CPU.
    An n_ctx beyond the trained context is lowered to it unless allow_long_context. Every value asked
    for that the plan changes is listed in `Plan.adjustments` with the reason.
    Raises PlanError only for settings llama.cpp itself would refuse.
    """
    check_kv_types(type_k, type_v, flash_attn)
    if (prefix_tokens is None) != (seq_tokens is None):
        raise ValueError("prefix_tokens and seq_tokens go together")
    n_ctx, adjustments = _adjust_asked(info, hw, n_ctx, n_parallel, n_gpu_layers, allow_long_context)
    ram = hw.effective_available_bytes
    search = _Search(
        info=info,
        budget=_Budget(
            ram,
            max(int(ram * RAM_MARGIN_FRACTION), RAM_MARGIN_MIN),
            hw.gpus[0] if hw.gpus and hw.gpu_offload_supported else None,
        ),
        threads=n_threads or max(1, hw.cpu_physical_cores),
        workload=(prefix_tokens or 0, seq_tokens) if seq_tokens is not None else None,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        type_k=type_k,
        type_v=type_v,
        swa_full=swa_full,
        flash_attn=flash_attn,
    )
    plan = search.plan(n_parallel, max_parallel)
    return plan.model_copy(update={"adjustments": adjustments}) if adjustments else plan


def _adjust_asked(info: GGUFInfo, hw: HardwareInfo, n_ctx: int | None, n_parallel: int | None, n_gpu_layers: int | None,
                  allow_long_context: bool) -> tuple[int | None, list[str]]:
    """The context asked for, kept within the trained context unless allow_long_context; and a line for every
    value asked for that the plan will change, with the reason."""
    adjustments: list[str] = []
    trained = info.context_length
    if n_ctx is not None and trained and n_ctx > trained and not allow_long_context:
        adjustments.append(
            f"ctx {n_ctx} -> {trained}: the model was trained for {trained} tokens "
            f"(--allow-long-context keeps {n_ctx}, at the risk of repetition or nonsense past {trained} tokens)"
        )
        n_ctx = trained
    elif n_ctx is not None and trained and n_ctx > trained:
        adjustments.append(f"ctx {n_ctx} kept past the {trained} tokens the model was trained for (--allow-long-context): "
                           f"expect repetition or nonsense beyond {trained} tokens")
    if n_ctx is not None and pad_ctx(n_ctx) != n_ctx:
        adjustments.append(f"ctx {n_ctx} -> {pad_ctx(n_ctx)}: llama.cpp sizes the context in blocks of {CTX_PAD} tokens")
    if n_parallel is not None and n_parallel > MAX_SEQ - 1:
        adjustments.append(
            f"parallel {n_parallel} -> {MAX_SEQ - 1}: one llama.cpp context holds at most {MAX_SEQ} sequences, "
            "one of them for the shared prompt prefix"
        )
    if n_gpu_layers not in (None, 0):
        asked = "-1 (all)" if n_gpu_layers < 0 else str(n_gpu_layers)
        if not (hw.gpus and hw.gpu_offload_supported):
            why = "no GPU found" if not hw.gpus else "this llama.cpp build cannot offload to a GPU (CPU only)"
            adjustments.append(f"gpu layers {asked} -> 0: {why}")
        elif n_gpu_layers > layer_count(info) + 1:
            adjustments.append(
                f"gpu layers {asked} -> {layer_count(info) + 1}: the model has {layer_count(info)} layers plus the output layer"
            )
    return n_ctx, adjustments


@dataclass(frozen=True)
class _Search:
    """make_plan's arguments, and the estimates it compares while it chooses."""

    info: GGUFInfo
    budget: _Budget
    threads: int
    workload: tuple[int, int] | None  # (shared prefix tokens, tokens of one sequence after it)
    n_ctx: int | None
    n_gpu_layers: int | None
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    swa_full: bool | None
    flash_attn: bool | None

    @property
    def n_layer(self) -> int:
        return layer_count(self.info)

    def plan(self, n_parallel: int | None, max_parallel: int | None) -> Plan:
        problem = self._problem()
        options = [self.estimate(p) for p in self._candidates(n_parallel, max_parallel)]
        fitting = [e for e in options if self.budget.fits(e)]
        full = self.n_layer + 1
        if fitting:  # every layer on the GPU first, then the most sequences
            chosen = max(fitting, key=lambda e: (e.settings.n_gpu_layers == full, e.settings.n_parallel))
        else:
            chosen = options[-1]
        fits = bool(fitting) and problem is None
        if problem:
            suggestions = self._shorter_sequences()
        elif fits:
            suggestions = []
        else:
            suggestions = self._suggestions(chosen)
        return _plan(chosen, self.budget, self.threads, fits, problem, suggestions)

    def _problem(self) -> str | None:
        """Why the known workload cannot run at all, whatever the memory."""
        if not self.workload:
            return None
        need, trained = sum(self.workload), self.info.context_length
        if self.n_ctx is None and trained and need > trained:
            return f"does not fit: one sequence needs {need} tokens, the model was trained for {trained}"
        if self.n_ctx is not None and need > pad_ctx(self.n_ctx):
            return f"does not fit: one sequence needs {need} tokens, more than --ctx {self.n_ctx}"
        return None

    def _shorter_sequences(self) -> list[str]:
        """What a sequence may hold after the shared prefix, when the context cannot hold one."""
        assert self.workload
        limit = pad_ctx(self.n_ctx) if self.n_ctx is not None else self.info.context_length or 0
        room = limit - self.workload[0]
        if room <= 0:
            return [f"the shared prompt prefix alone ({self.workload[0]} tokens) is longer than {limit}"]
        return [f"at most {room} tokens a sequence (prompt suffix + max tokens) fit after the shared prefix"]

    def _candidates(self, n_parallel: int | None, max_parallel: int | None) -> list[int]:
        if n_parallel is not None:
            return [min(n_parallel, MAX_SEQ - 1)]
        cap = min(max_parallel or MAX_SEQ - 1, MAX_SEQ - 1)
        ladder = GPU_PARALLEL if self._layers_requested() != 0 else CPU_PARALLEL
        candidates = sorted({min(p, cap) for p in ladder}, reverse=True)
        trained = self.info.context_length
        if self.workload and trained and self.n_ctx is None:  # sequences beyond the trained context would only queue
            candidates = [p for p in candidates if self.workload[0] + p * self.workload[1] <= trained]
        elif not self.workload:  # unknown lengths: leave each sequence at least 256 cells
            candidates = [p for p in candidates if p * CTX_PAD <= self.ctx_for(p)]
        return candidates or [1]

    def ctx_for(self, n_parallel: int) -> int:
        if self.n_ctx is not None:
            return pad_ctx(self.n_ctx)
        trained = self.info.context_length
        if self.workload:
            need = self.workload[0] + n_parallel * self.workload[1]
            return pad_ctx(min(need, trained) if trained else need)
        return pad_ctx(min(trained or DEFAULT_CTX, DEFAULT_CTX))

    def _layers_requested(self) -> int | None:
        """Layers to offload: 0 without a usable GPU, None for "as many as fit", else clamped to n_layer + 1."""
        if self.budget.gpu is None:
            return 0
        if self.n_gpu_layers is None:
            return None
        if self.n_gpu_layers < 0:
            return self.n_layer + 1
        return min(self.n_gpu_layers, self.n_layer + 1)

    def settings(self, n_parallel: int, n_ctx: int, n_gpu_layers: int) -> Settings:
        batch = min(self.n_batch, n_ctx)
        swa_full = self.swa_full
        if swa_full is None:
            window = self.info.sliding_window
            swa_full = bool(window and self.workload and sum(self.workload) > window)
        flash_attn = self.flash_attn
        if flash_attn is None:
            flash_attn = n_gpu_layers > 0 or self.type_v not in FLOAT_TYPES
        return Settings(
            n_ctx,
            n_parallel,
            n_gpu_layers,
            batch,
            min(self.n_ubatch, batch),
            swa_full,
            flash_attn,
            self.type_k,
            self.type_v,
        )

    def estimate(
        self, n_parallel: int, n_ctx: int | None = None, n_gpu_layers: int | None = None, info: GGUFInfo | None = None
    ) -> Estimate:
        """The estimate for these settings; the context, GPU layers and model default to the search's."""
        info = info or self.info
        ctx = self.ctx_for(n_parallel) if n_ctx is None else n_ctx
        layers = self._layers_requested() if n_gpu_layers is None else n_gpu_layers
        if layers is None:  # auto: the most layers whose GPU share fits
            layers = (
                _largest(
                    0,
                    self.n_layer + 1,
                    lambda g: self.budget.gpu_fits(estimate_memory(info, self.settings(n_parallel, ctx, g))),
                )
                or 0
            )
        return estimate_memory(info, self.settings(n_parallel, ctx, layers))

    def _suggestions(self, chosen: Estimate) -> list[str]:
        """Settings near `chosen` that fit, best first."""
        s, fits, out = chosen.settings, self.budget.fits, []
        if self.n_ctx is not None or not self.workload:  # the context is a free knob
            low = pad_ctx(sum(self.workload)) // CTX_PAD if self.workload else 1
            k = _largest(low, s.n_ctx // CTX_PAD - 1, lambda k: fits(self.estimate(s.n_parallel, k * CTX_PAD)))
            if k is not None:
                out.append(f"--ctx {k * CTX_PAD} fits")
        if s.n_parallel > 1:
            p = _largest(1, s.n_parallel - 1, lambda p: fits(self.estimate(p)))
            if p is not None:
                out.append(f"--parallel {p} fits")
        if self.budget.gpu is not None and not self.budget.gpu_fits(chosen):
            g = _largest(0, s.n_gpu_layers - 1, lambda g: self.budget.gpu_fits(self.estimate(s.n_parallel, s.n_ctx, g)))
            if g is not None and fits(self.estimate(s.n_parallel, s.n_ctx, g)):
                out.append(f"--gpu-layers {g} fits")
        quant = _smaller_quant(self.info, lambda q: self.estimate(s.n_parallel, s.n_ctx, info=q), self.budget)
        if quant:
            out.append(quant)
        return out or ["nothing smaller fits: free some memory or choose a smaller model"]


def _plan(
    est: Estimate, budget: _Budget, threads: int, fits: bool, problem: str | None, suggestions: list[str]
) -> Plan:
    s = est.settings
    usable = max(budget.ram - budget.ram_margin, 0)
    where = f"{s.n_gpu_layers} layers on the GPU" if s.n_gpu_layers else "CPU only"
    setup = f"ctx {s.n_ctx}, {s.n_parallel} parallel, {where}"
    if problem:
        verdict = problem
    elif fits:
        gpu_part = f" and {format_bytes(est.gpu)} of GPU memory" if est.gpu else ""
        need = format_bytes(budget.ram_need(est))
        verdict = f"fits: {need} of RAM{gpu_part}, {format_bytes(usable)} usable ({setup})"
    elif not budget.ram_fits(est):
        verdict = (
            f"does not fit: need {format_bytes(budget.ram_need(est))} of RAM, have {format_bytes(usable)} "
            f"({format_bytes(budget.ram)} available less a {format_bytes(budget.ram_margin)} margin; {setup})"
        )
    else:
        free = max(budget.gpu.vram_free_bytes - budget.gpu_margin, 0) if budget.gpu else 0
        verdict = f"does not fit: need {format_bytes(est.gpu)} of GPU memory, have {format_bytes(free)} ({setup})"
    return Plan(
        fits=fits,
        verdict=verdict,
        suggestions=suggestions,
        n_ctx=s.n_ctx,
        n_parallel=s.n_parallel,
        n_seq_max=s.n_seq_max,
        n_outputs_max=s.n_seq_max,
        n_gpu_layers=s.n_gpu_layers,
        n_threads=threads,
        n_batch=s.n_batch,
        n_ubatch=s.n_ubatch,
        swa_full=s.swa_full,
        flash_attn=s.flash_attn,
        type_k=s.type_k,
        type_v=s.type_v,
        kv_swa_cells=est.swa_cells,
        weights_bytes=est.weights_cpu + est.weights_gpu,
        kv_cache_bytes=est.kv_cpu + est.kv_gpu,
        compute_bytes=est.compute_cpu + est.compute_gpu,
        other_bytes=est.other,
        total_bytes=est.cpu + est.gpu,
        cpu_bytes=est.cpu,
        gpu_bytes=est.gpu,
        available_bytes=budget.ram,
        margin_bytes=budget.ram_margin,
        gpu_available_bytes=budget.gpu.vram_free_bytes if budget.gpu else None,
        gpu_margin_bytes=budget.gpu_margin if budget.gpu else None,
    )


def _smaller_quant(info: GGUFInfo, estimate: Callable[[GGUFInfo], Estimate], budget: _Budget) -> str | None:
    """'a Q4_K_M quant would need about X' for the largest standard quant below this file's that fits."""
    if not info.n_params:
        return None
    bpw = info.weights_bytes * 8 / info.n_params
    names = list(_QUANT_BPW)
    if info.file_type in _QUANT_BPW:  # only the mixes below this one (bpw runs high with big embeddings)
        names = names[names.index(info.file_type) + 1 :]
    for name in names:
        target = _QUANT_BPW[name]
        if target >= bpw * 0.95:
            continue
        scale = target / bpw
        smaller = info.model_copy(
            update={
                "weights_bytes": int(info.weights_bytes * scale),
                "layer_bytes": [int(b * scale) for b in info.layer_bytes],
                "input_bytes": int(info.input_bytes * scale),
                "output_bytes": int(info.output_bytes * scale),
                "token_embd_bytes": int(info.token_embd_bytes * scale),
            }
        )
        est = estimate(smaller)
        if budget.fits(est):
            return f"a {name} quant would need about {format_bytes(budget.ram_need(est))} of RAM" + (
                f" and {format_bytes(est.gpu)} of GPU memory" if est.gpu else ""
            )
    return None


def _largest(low: int, high: int, ok: Callable[[int], bool]) -> int | None:
    """The largest k in [low, high] with ok(k), for ok true up to some point and false after it."""
    if high < low or not ok(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low
