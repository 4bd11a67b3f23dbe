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

Where each term comes from (llama.cpp as vendored in llama-cpp-python 0.3.36):

* weights: the tensor bytes of the file. Loaded with mmap: the pages of CPU tensors are counted as
  RAM because inference touches all of them (the kernel could drop them, at the price of reading
  the file again on every token). With `n_gpu_layers = g`, llama.cpp puts the output layer on the
  GPU first, then the last g - 1 blocks (llama-model.cpp: `i_gpu_start = n_layer + 1 - g`); the
  token embedding stays on the CPU, and a tied output head is duplicated onto the GPU. The CPU
  backend's weight repacking (CPU_REPACK, for Q4_0/Q4_K/IQ4_NL on AVX2 or NEON) copies some
  tensors into anonymous memory; their mmap'd originals are then never read again and the kernel
  may drop them, so the weights are counted once, and RSS can show up to the repacked size more.
* KV cache: `cells * n_head_kv * (key_length * b_k + value_length * b_v)` per layer, with b the
  bytes per element of the cache type (2 for f16, 34/32 for q8_0, 18/32 for q4_0). Full-attention
  layers get `n_ctx` cells (padded to 256, llama-context.cpp). Sliding-window layers get
  `GGML_PAD(min(n_ctx, n_swa * n_seq_max + n_ubatch), 256)` cells with a unified cache, or `n_ctx`
  with `swa_full` (llama-kv-cache-iswa.cpp). Which layers slide: `{arch}.attention.sliding_window_pattern`
  or the architecture's default pattern (for gemma3 every 6th layer is global: layers 5, 11, 17, ...).
* compute buffer: the peak of llama.cpp's graph allocator for the worst-case batches it reserves at
  load (llama-context.cpp `sched_reserve`, `graph_reserve`): T = n_ubatch tokens rounded up to a
  multiple of n_seq_max, every cache cell visible, and T = n_seq_max (one token a sequence). Its
  tensors are reused across layers, so the peak is the largest of three phases:
    attention (no flash attention): inputs + 4*T*(n_head*n_kv + 4*n_embd + 2*n_head*d_k)
        with n_kv the largest cache, and inputs = the f32 masks (4*T*cells, one per cache: full and
        sliding), the V-cache row indices (8*T*n_head_kv*d_v per cache) and 32*T bytes of positions
        and ids, which all stay alive through every layer;
    feed-forward: inputs + 4*T*(3*n_ff + 3*n_embd + n_head*d_k);
    output: 4*(n_outputs*n_vocab + 3*T*n_embd), n_outputs = min(T, n_outputs_max).
  With flash attention there is no n_head*n_kv score matrix and the masks are f16. The shape of
  each phase follows llama-graph.cpp (build_attn_mha: kq = [n_kv, T, n_head] f32, softmax in place;
  build_ffn: gate, up and the activation, each [n_ff, T]); the coefficients were fitted to the
  sizes llama.cpp prints (`CPU compute buffer size`) for the demo model (Gemma 3 270M) and for
  synthetic llama-architecture files with n_embd 512-4096, n_ff 4096-8192, 8-32 heads, head size
  32-256, 1-16 KV heads, vocabularies of 4k-262k, n_ctx 256-16384, n_seq_max 1-128 and n_ubatch
  128-2048: 0 to +7 % over (+10 % at n_ctx 512 on the demo model: 2 MiB), never under.
  The engine sets `n_outputs_max = n_seq_max` (it asks for at most one logit row per sequence per
  decode); llama.cpp's default (n_batch) would reserve n_batch*n_vocab*4 bytes, 512 MiB for a
  262k vocabulary.
* other (CPU): llama.cpp's output buffer (n_outputs_max*n_vocab*4 bytes), the vocabulary
  (~170 bytes a token measured, 192 counted), the CPU backend's work buffer, which llama.cpp does
  not report (ggml-cpu converts a matmul's f32 input to the weight's dot type there; the largest
  is the attention scores converted to f16 for the product with V, 2*T*n_head*n_kv bytes: 116 MiB
  measured where this gives 128 MiB; with flash attention 4*T*max(n_ff, n_embd) bounds it), and
  the Python runtime with llama_cpp and the appliance imported (measured).
  llama.cpp's own bookkeeping (graph metadata, thread pool) is in the runtime and vocabulary figures.
  The engine uses the low-level API, so llama-cpp-python's `Llama.scores` array (n_batch*n_vocab*4)
  is never allocated.
* margin: 10% of the available RAM or 512 MiB, whichever is larger; on a GPU, 1 GiB or 10% of its
  memory, whichever is smaller (llama.cpp's own fitter keeps 1 GiB per device).

GPU figures are extrapolated from the same graph model (compute buffer on the GPU when any layer is
there); they were not measured on a GPU. Multi-GPU splits and mixture-of-experts feed-forward
blocks are not modelled (the first GPU only; n_ff as the dense width).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from pydantic import BaseModel, Field

from .errors import PlanError
from .gguf_info import GGUFInfo
from .hardware import GPUInfo, HardwareInfo

MiB = 1 << 20
GiB = 1 << 30

CTX_PAD = 256  # llama_context rounds n_ctx up to a multiple of 256
DEFAULT_CTX = 4096
MAX_SEQ = 256  # LLAMA_MAX_SEQ: sequences one context can hold
CPU_PARALLEL = (16, 8, 4, 2, 1)  # 16 measured best on CPU (docs/benchmarks.md)
GPU_PARALLEL = (64, 32, 16, 8, 4, 2, 1)
RAM_MARGIN_FRACTION, RAM_MARGIN_MIN = 0.10, 512 * MiB
GPU_MARGIN_FRACTION, GPU_MARGIN_MAX = 0.10, 1 * GiB
# RSS of a Python process with llama_cpp and the appliance's modules imported, before a model is
# loaded: 108 MiB measured (the quality filters pull in datasketch and scipy; the engine alone: 58 MiB).
RUNTIME_BYTES = 112 * MiB
VOCAB_BYTES_PER_TOKEN = 192  # llama_vocab's tables: ~165-170 bytes a token measured (32k and 262k vocabularies)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
_FLOAT_TYPES = ("f32", "f16", "bf16")

# Default sliding-window layout per architecture, when the file has a sliding window but no
# `{arch}.attention.sliding_window_pattern`: (n_pattern, dense_first) as each llama.cpp model
# calls load_swa_pattern (src/models/*.cpp). As llama_hparams::set_swa_pattern: layer il slides when
# il % n_pattern < n_pattern - 1 (il % n_pattern != 0 when dense_first); n_pattern 0: every layer slides.
_SWA_PATTERNS: dict[str, tuple[int | None, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "mellum": (4, False),
    "afmoe": (4, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}

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


def format_bytes(n: int | float) -> str:
    """1288490188 -> '1.20 GiB'; binary units, two decimals."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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
class _Settings:
    n_ctx: int
    n_parallel: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    swa_full: bool
    flash_attn: bool
    type_k: str
    type_v: str

    @property
    def n_seq_max(self) -> int:
        return self.n_parallel + 1


@dataclass(frozen=True)
class _Estimate:
    settings: _Settings
    weights_cpu: int
    weights_gpu: int
    kv_cpu: int
    kv_gpu: int
    compute_cpu: int
    compute_gpu: int
    other: int
    swa_cells: int | None

    @property
    def cpu(self) -> int:
        return self.weights_cpu + self.kv_cpu + self.compute_cpu + self.other

    @property
    def gpu(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute_gpu


@dataclass(frozen=True)
class _Budget:
    ram: int
    ram_margin: int
    gpu: GPUInfo | None

    @property
    def gpu_margin(self) -> int:
        return min(GPU_MARGIN_MAX, int(self.gpu.vram_total_bytes * GPU_MARGIN_FRACTION)) if self.gpu else 0

    def ram_need(self, est: _Estimate) -> int:
        # Metal's GPU memory is the same RAM: both sides draw on it.
        return est.cpu + (est.gpu if self.gpu and self.gpu.backend == "metal" else 0)

    def ram_fits(self, est: _Estimate) -> bool:
        return self.ram_need(est) <= self.ram - self.ram_margin

    def gpu_fits(self, est: _Estimate) -> bool:
        if est.gpu == 0:
            return True
        return self.gpu is not None and est.gpu <= self.gpu.vram_free_bytes - self.gpu_margin

    def fits(self, est: _Estimate) -> bool:
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
    for name, kv_type in (("type_k", type_k), ("type_v", type_v)):
        if kv_type not in KV_TYPES:
            raise PlanError(f"{name} {kv_type!r} is not a KV cache type llama.cpp supports ({', '.join(KV_TYPES)})")
    if type_v not in _FLOAT_TYPES and flash_attn is False:
        raise PlanError(f"a {type_v} V cache needs flash attention (llama.cpp refuses it without)")
    if (prefix_tokens is None) != (seq_tokens is None):
        raise ValueError("prefix_tokens and seq_tokens go together")
    adjustments = []
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
    if n_ctx is not None and _pad(n_ctx) != n_ctx:
        adjustments.append(f"ctx {n_ctx} -> {_pad(n_ctx)}: llama.cpp sizes the context in blocks of {CTX_PAD} tokens")
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
        elif n_gpu_layers > _n_layer(info) + 1:
            adjustments.append(
                f"gpu layers {asked} -> {_n_layer(info) + 1}: the model has {_n_layer(info)} layers plus the output layer"
            )
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
        return _n_layer(self.info)

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
        if self.n_ctx is not None and need > _pad(self.n_ctx):
            return f"does not fit: one sequence needs {need} tokens, more than --ctx {self.n_ctx}"
        return None

    def _shorter_sequences(self) -> list[str]:
        """What a sequence may hold after the shared prefix, when the context cannot hold one."""
        assert self.workload
        limit = _pad(self.n_ctx) if self.n_ctx is not None else self.info.context_length or 0
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
            return _pad(self.n_ctx)
        trained = self.info.context_length
        if self.workload:
            need = self.workload[0] + n_parallel * self.workload[1]
            return _pad(min(need, trained) if trained else need)
        return _pad(min(trained or DEFAULT_CTX, DEFAULT_CTX))

    def _layers_requested(self) -> int | None:
        """Layers to offload: 0 without a usable GPU, None for "as many as fit", else clamped to n_layer + 1."""
        if self.budget.gpu is None:
            return 0
        if self.n_gpu_layers is None:
            return None
        if self.n_gpu_layers < 0:
            return self.n_layer + 1
        return min(self.n_gpu_layers, self.n_layer + 1)

    def settings(self, n_parallel: int, n_ctx: int, n_gpu_layers: int) -> _Settings:
        batch = min(self.n_batch, n_ctx)
        swa_full = self.swa_full
        if swa_full is None:
            window = self.info.sliding_window
            swa_full = bool(window and self.workload and sum(self.workload) > window)
        flash_attn = self.flash_attn
        if flash_attn is None:
            flash_attn = n_gpu_layers > 0 or self.type_v not in _FLOAT_TYPES
        return _Settings(
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
    ) -> _Estimate:
        """The estimate for these settings; the context, GPU layers and model default to the search's."""
        info = info or self.info
        ctx = self.ctx_for(n_parallel) if n_ctx is None else n_ctx
        layers = self._layers_requested() if n_gpu_layers is None else n_gpu_layers
        if layers is None:  # auto: the most layers whose GPU share fits
            layers = (
                _largest(
                    0,
                    self.n_layer + 1,
                    lambda g: self.budget.gpu_fits(_estimate(info, self.settings(n_parallel, ctx, g))),
                )
                or 0
            )
        return _estimate(info, self.settings(n_parallel, ctx, layers))

    def _suggestions(self, chosen: _Estimate) -> list[str]:
        """Settings near `chosen` that fit, best first."""
        s, fits, out = chosen.settings, self.budget.fits, []
        if self.n_ctx is not None or not self.workload:  # the context is a free knob
            low = _pad(sum(self.workload)) // CTX_PAD if self.workload else 1
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
    est: _Estimate, budget: _Budget, threads: int, fits: bool, problem: str | None, suggestions: list[str]
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


def _estimate(info: GGUFInfo, s: _Settings) -> _Estimate:
    """Bytes on the CPU and the GPU for these settings (see the module docstring for the formulas)."""
    n_layer = _n_layer(info)
    layer_bytes = _layer_bytes(info, n_layer)
    first_gpu = n_layer + 1 - s.n_gpu_layers  # layers il >= first_gpu are offloaded; il == n_layer is the output
    on_gpu = [il >= first_gpu for il in range(n_layer)]
    output_gpu = s.n_gpu_layers > 0

    gpu_blocks = sum(b for b, g in zip(layer_bytes, on_gpu, strict=True) if g)
    output_copy = info.output_bytes + (info.token_embd_bytes if info.output_tied else 0)
    weights_gpu = gpu_blocks + (output_copy if output_gpu else 0)
    weights_cpu = info.weights_bytes - gpu_blocks - (info.output_bytes if output_gpu else 0)

    swa = _swa_layers(info, n_layer)
    full_cells = swa_cells = s.n_ctx
    if any(swa) and not s.swa_full:
        swa_cells = _pad(min(full_cells, (info.sliding_window or 0) * s.n_seq_max + s.n_ubatch))
    cell_bytes = info.head_count_kv * (
        info.key_length * _bytes_per_element(s.type_k) + info.value_length * _bytes_per_element(s.type_v)
    )
    kv = [int((swa_cells if is_swa else full_cells) * cell_bytes) for is_swa in swa]
    kv_gpu = sum(b for b, g in zip(kv, on_gpu, strict=True) if g)
    kv_cpu = sum(kv) - kv_gpu

    caches = ([full_cells] if not all(swa) else []) + ([swa_cells] if any(swa) else [])
    graph = _Graph(info, s, caches)
    cpu_blocks = on_gpu.count(False)
    compute_gpu = max(graph.layers if cpu_blocks < n_layer else 0, graph.output if output_gpu else 0)
    compute_cpu = max(graph.layers if cpu_blocks else graph.host, graph.output if not output_gpu else 0)

    n_vocab = info.vocab_size
    other = (
        RUNTIME_BYTES
        + n_vocab * VOCAB_BYTES_PER_TOKEN
        + 4 * n_vocab * s.n_seq_max  # llama.cpp's output buffer: n_outputs_max rows of logits
        + (graph.work if cpu_blocks else 0)
    )
    return _Estimate(
        s, weights_cpu, weights_gpu, kv_cpu, kv_gpu, compute_cpu, compute_gpu, other, swa_cells if any(swa) else None
    )


class _Graph:
    """Peak sizes of llama.cpp's compute graph for the two batches it reserves at load: a full
    micro-batch (n_ubatch tokens, n_outputs_max outputs) and one token per sequence."""

    def __init__(self, info: GGUFInfo, s: _Settings, caches: list[int]) -> None:
        self.info, self.s, self.caches = info, s, caches
        # The reserved micro-batch is split evenly over n_seq_max sequences: n_ubatch rounded up to a
        # multiple of n_seq_max (llama_context::graph_reserve).
        t = -(-s.n_ubatch // s.n_seq_max) * s.n_seq_max
        batches = [(t, min(t, s.n_seq_max)), (s.n_seq_max, s.n_seq_max)]  # (tokens, outputs)
        self.layers = max(self._layers(tokens) for tokens, _ in batches)
        self.output = max(self._output(tokens, outputs) for tokens, outputs in batches)
        # With every layer on the GPU the CPU still embeds the tokens (a host buffer of a few MiB).
        self.host = 4 * t * info.embedding_length * 2
        scores = 0 if s.flash_attn else 2 * t * info.head_count * max(caches, default=0)
        self.work = max(scores, 4 * t * max(info.feed_forward_length or 0, info.embedding_length))

    def _layers(self, t: int) -> int:
        i, s = self.info, self.s
        q_dim = i.head_count * i.key_length
        # + 32 bytes a token: positions, token ids, K-cache row indices and output ids
        masks = t * sum(self.caches) * (2 if s.flash_attn else 4) + 32 * t
        v_rows = 0 if s.flash_attn else 8 * t * i.head_count_kv * i.value_length * len(self.caches)
        ffn = 4 * t * (3 * (i.feed_forward_length or 4 * i.embedding_length) + 3 * i.embedding_length + q_dim)
        scores = i.head_count * max(self.caches, default=0)
        attn = 0 if s.flash_attn else 4 * t * (scores + 4 * i.embedding_length + 2 * q_dim)
        return masks + v_rows + max(attn, ffn)

    def _output(self, t: int, outputs: int) -> int:
        return 4 * (outputs * self.info.vocab_size + 3 * t * self.info.embedding_length)


def _smaller_quant(info: GGUFInfo, estimate: Callable[[GGUFInfo], _Estimate], budget: _Budget) -> str | None:
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


def _pad(n: int) -> int:
    return max(CTX_PAD, -(-n // CTX_PAD) * CTX_PAD)


def _n_layer(info: GGUFInfo) -> int:
    return max(info.block_count, len(info.layer_bytes))


def _layer_bytes(info: GGUFInfo, n_layer: int) -> list[int]:
    if len(info.layer_bytes) == n_layer:
        return info.layer_bytes
    rest = info.weights_bytes - info.input_bytes - info.output_bytes
    return [rest // n_layer] * n_layer


def _bytes_per_element(ggml_type: str) -> float:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]]
    return size / block


def _swa_layers(info: GGUFInfo, n_layer: int) -> list[bool]:
    """Which layers use the sliding window. Unknown layouts count as full attention (the larger cache)."""
    if not info.sliding_window:
        return [False] * n_layer
    n_pattern, dense_first = _SWA_PATTERNS.get(info.architecture, (None, False))
    stored = info.metadata.get(f"{info.architecture}.attention.sliding_window_pattern")
    if isinstance(stored, int) and not isinstance(stored, bool):
        n_pattern = stored
    elif stored is not None:  # a per-layer array, which GGUFInfo keeps only as a summary
        n_pattern = None
    if n_pattern is None:
        return [False] * n_layer
    if n_pattern == 0:
        return [True] * n_layer
    if dense_first:
        return [il % n_pattern != 0 for il in range(n_layer)]
    return [il % n_pattern < n_pattern - 1 for il in range(n_layer)]
