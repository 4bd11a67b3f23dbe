"""The memory estimate: the bytes one llama.cpp context takes for given settings, read from a GGUF header.

Nothing is loaded: `estimate_memory` turns a GGUF header (`GGUFInfo`) and `Settings` (context, sequences,
GPU layers, batch, cache types) into bytes on the CPU and the GPU. `appliance.planner` chooses the settings
and decides whether they fit.

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

GPU figures are extrapolated from the same graph model (compute buffer on the GPU when any layer is
there); they were not measured on a GPU. Multi-GPU splits and mixture-of-experts feed-forward
blocks are not modelled (the first GPU only; n_ff as the dense width).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import PlanError
from ..models.info import GGUFInfo

MiB = 1 << 20
GiB = 1 << 30

CTX_PAD = 256  # llama_context rounds n_ctx up to a multiple of 256
# RSS of a Python process with llama_cpp and the appliance's modules imported, before a model is
# loaded: 108 MiB measured (the quality filters pull in datasketch and scipy; the engine alone: 58 MiB).
RUNTIME_BYTES = 112 * MiB
VOCAB_BYTES_PER_TOKEN = 192  # llama_vocab's tables: ~165-170 bytes a token measured (32k and 262k vocabularies)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
FLOAT_TYPES = ("f32", "f16", "bf16")

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


def check_kv_types(type_k: str, type_v: str, flash_attn: bool | None) -> None:
    """Refuse KV cache types llama.cpp would refuse."""
    for name, kv_type in (("type_k", type_k), ("type_v", type_v)):
        if kv_type not in KV_TYPES:
            raise PlanError(f"{name} {kv_type!r} is not a KV cache type llama.cpp supports ({', '.join(KV_TYPES)})")
    if type_v not in FLOAT_TYPES and flash_attn is False:
        raise PlanError(f"a {type_v} V cache needs flash attention (llama.cpp refuses it without)")


def format_bytes(n: int | float) -> str:
    """1288490188 -> '1.20 GiB'; binary units, two decimals."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Settings:
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
class Estimate:
    settings: Settings
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


def estimate_memory(info: GGUFInfo, s: Settings) -> Estimate:
    """Bytes on the CPU and the GPU for these settings (see the module docstring for the formulas)."""
    n_layer = layer_count(info)
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
        swa_cells = pad_ctx(min(full_cells, (info.sliding_window or 0) * s.n_seq_max + s.n_ubatch))
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
    return Estimate(
        s, weights_cpu, weights_gpu, kv_cpu, kv_gpu, compute_cpu, compute_gpu, other, swa_cells if any(swa) else None
    )


class _Graph:
    """Peak sizes of llama.cpp's compute graph for the two batches it reserves at load: a full
    micro-batch (n_ubatch tokens, n_outputs_max outputs) and one token per sequence."""

    def __init__(self, info: GGUFInfo, s: Settings, caches: list[int]) -> None:
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


def pad_ctx(n: int) -> int:
    return max(CTX_PAD, -(-n // CTX_PAD) * CTX_PAD)


def layer_count(info: GGUFInfo) -> int:
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
