"""Check the planner's memory estimate against what llama.cpp allocates and what the process uses.

    python scripts/bench_planner.py [--model PATH] [--write docs/benchmarks-planner.md]

For each demo setting (n_ctx, n_parallel[, swa_full][, flash_attn]) a fresh Python process loads the
model the way the engine does (the low-level API with `Plan.model_params()` and
`Plan.context_params()`: one context, a unified KV cache, n_seq_max = n_parallel + 1), then runs the
engine's workload shape until the context is full: a shared prefix decoded once into the holder
sequence and copied to every sequence, each sequence's own suffix fed in n_batch-token batches, then
16 tokens generated for all sequences at once (greedy, one logit row per sequence per decode). The
parent reads the buffer sizes llama.cpp logs at load and the child's memory figures.

Then, to check the compute-buffer model beyond one architecture, it writes small llama-architecture
files with other shapes (two layers of zero weights; real vocabularies sizes) and compares the KV
cache and compute buffer llama.cpp reserves for them at load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import psutil

from appliance.plan.estimate import RUNTIME_BYTES, VOCAB_BYTES_PER_TOKEN, MiB
from appliance.models.gguf import read_gguf
from appliance.plan.hardware import detect_hardware
from appliance.models.registry import demo_model_path
from appliance.plan.planner import Plan, make_plan

SETTINGS: list[tuple[int, int, dict[str, Any]]] = [  # n_ctx, n_parallel, extra make_plan arguments
    (512, 1, {}),
    (2048, 1, {}),
    (4096, 4, {}),
    (4096, 4, {"swa_full": True}),
    (8192, 16, {}),
    (4096, 4, {"flash_attn": True}),
]
# Synthetic shapes: n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab; then n_ctx, n_parallel, flash_attn.
SYNTHETIC: list[tuple[tuple[int, int, int, int, int, int], int, int, bool]] = [
    ((512, 1536, 8, 2, 64, 32000), 2048, 4, False),
    ((1024, 4096, 16, 4, 64, 32000), 512, 1, False),
    ((1024, 4096, 16, 4, 64, 32000), 8192, 16, False),
    ((2048, 8192, 16, 8, 128, 32000), 4096, 8, False),
    ((2048, 8192, 16, 8, 128, 32000), 1024, 8, True),
    ((3072, 8192, 24, 8, 128, 128256), 2048, 16, False),
    ((4096, 14336, 32, 8, 128, 32000), 1024, 1, False),  # Mistral 7B's shape
    ((4096, 14336, 32, 8, 128, 32000), 4096, 4, False),
    ((4096, 14336, 32, 8, 128, 32000), 4096, 4, True),
]
GENERATED = 16
# llama.cpp's load log: "load_tensors: CPU_Mapped model buffer size = 235.16 MiB", "llama_kv_cache:
# CPU KV buffer size = 12.00 MiB" (one line per cache), "CPU compute buffer size", "CPU output buffer size".
_BUFFER = re.compile(r"^\S+:\s+(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB", re.M)


def measure(model: Path, plan: Plan, *, fill: bool = True, **overrides: int) -> dict[str, Any]:
    """Run one setting in a fresh process; its memory figures and the buffer sizes llama.cpp logged."""
    job = {
        "model": str(model),
        "model_params": plan.model_params(),
        "context_params": {**plan.context_params(), **overrides},
        "n_parallel": plan.n_parallel,
        "fill": fill,
    }
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    buffers: dict[str, float] = {}
    for name, kind, mib in _BUFFER.findall(proc.stderr):
        key = f"{name} {kind}" if kind == "model" else kind
        buffers[key] = buffers.get(key, 0.0) + float(mib) * MiB
    result["buffers"] = buffers
    return result


def child(job: dict[str, Any]) -> None:
    """Load, fill the context the engine's way (when asked), and print the memory figures as one JSON line."""
    import ctypes

    import llama_cpp as ll

    import appliance.runs.generate  # noqa: F401  (what `appliance generate` imports: part of the runtime)
    import appliance.data.filters  # noqa: F401

    figures: dict[str, Any] = {"import": _status()}
    ll.llama_backend_init()
    mparams = ll.llama_model_default_params()
    for key, value in job["model_params"].items():
        setattr(mparams, key, value)
    model = ll.llama_model_load_from_file(job["model"].encode(), mparams)
    figures["model"] = _status()
    figures["model_file_rss"] = _mapped_rss(job["model"])
    cparams = ll.llama_context_default_params()
    for key, value in job["context_params"].items():
        setattr(cparams, key, value)
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    figures["context"] = _status()
    if not job["fill"]:
        print(json.dumps(figures))
        return

    n_ctx, n_batch, n_par = ll.llama_n_ctx(ctx), job["context_params"]["n_batch"], job["n_parallel"]
    holder = n_par
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    mem = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(n_batch, 0, 1)
    rng = np.random.default_rng(0)
    prefix = min(n_ctx // 4, 1024)
    suffix = (n_ctx - prefix) // n_par - GENERATED - 1

    def decode(items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, wants logits); returns the greedy next token of each logit row."""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit(f"llama_decode failed at {len(items)} tokens")
        out = []
        for i in (i for i, item in enumerate(items) if item[3]):
            ptr = ctypes.cast(ll.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float))
            out.append(int(np.ctypeslib.as_array(ptr, (n_vocab,)).argmax()))
        return out

    def tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(1000, n_vocab - 1000, n)]

    work = [(t, pos, holder, False) for pos, t in enumerate(tokens(prefix))]
    for seq in range(n_par):
        ll.llama_memory_seq_cp(mem, holder, seq, -1, -1)
        work += [(t, prefix + j, seq, j == suffix - 1) for j, t in enumerate(tokens(suffix))]
    last: dict[int, int] = {}
    for start in range(0, len(work), n_batch):
        chunk = work[start : start + n_batch]
        for (_, _, seq, _), tok in zip([w for w in chunk if w[3]], decode(chunk), strict=True):
            last[seq] = tok
    for step in range(GENERATED):
        seqs = sorted(last)
        last = dict(zip(seqs, decode([(last[s], prefix + suffix + step, s, True) for s in seqs]), strict=True))
    figures["end"] = _status()
    print(json.dumps(figures))


def _status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _mapped_rss(path: str) -> int:
    """Resident bytes of the mappings of `path` (the mmap'd weights)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def write_synthetic(
    path: Path, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int, n_vocab: int
) -> None:
    """A two-layer llama-architecture GGUF of zero Q8_0 weights with a minimal SentencePiece vocabulary."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(32768)
    w.add_embedding_length(n_embd)
    w.add_block_count(2)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    special = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    w.add_token_list(special + [f"t{i}".encode() for i in range(n_vocab - len(special))])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - len(special)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name: str, cols: int, rows: int) -> None:
        w.add_tensor(name, np.zeros((rows, cols // 32 * 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    matrix("token_embd.weight", n_embd, n_vocab)
    norm("output_norm.weight")
    matrix("output.weight", n_embd, n_vocab)
    for i in range(2):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for name, cols, rows in (
            ("attn_q", n_embd, q_dim),
            ("attn_k", n_embd, kv_dim),
            ("attn_v", n_embd, kv_dim),
            ("attn_output", q_dim, n_embd),
            ("ffn_gate", n_embd, n_ff),
            ("ffn_up", n_embd, n_ff),
            ("ffn_down", n_ff, n_embd),
        ):
            matrix(f"blk.{i}.{name}.weight", cols, rows)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def _err(estimate: float, measured: float) -> str:
    return f"{(estimate - measured) / measured * 100:+.1f}%" if measured else "n/a"


def _pair(estimate: float, measured: float) -> str:
    return f"{_mib(estimate)} / {_mib(measured)} ({_err(estimate, measured)})"


def demo_tables(model: Path) -> tuple[list[str], list[str], str]:
    """Components and totals for the demo settings, and the compute buffer with llama.cpp's default n_outputs_max."""
    info = read_gguf(model)
    hw = detect_hardware()
    components = [
        "| setting | weights | KV cache | compute buffer | output buffer | runtime + vocabulary |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    totals = [
        "| setting | estimate | llama.cpp buffers + runtime | error | peak RSS | error | CPU_REPACK |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n_ctx, n_parallel, extra in SETTINGS:
        plan = make_plan(info, hw, n_ctx=n_ctx, n_parallel=n_parallel, **extra)
        m = measure(model, plan)
        b = m["buffers"]
        weights = sum(v for k, v in b.items() if k.endswith("_Mapped model"))
        repack = b.get("CPU_REPACK model", 0.0)
        kv, compute, output = b.get("KV", 0.0), b.get("compute", 0.0), b.get("output", 0.0)
        # Besides llama.cpp's buffers the process holds Python, the libraries and the vocabulary: the
        # RSS after the model load less the mapped weights and the repacked copies.
        runtime = m["model"]["VmRSS"] - m["model_file_rss"] - repack
        est_output = 4 * info.vocab_size * plan.n_seq_max
        est_runtime = RUNTIME_BYTES + VOCAB_BYTES_PER_TOKEN * info.vocab_size
        measured = weights + kv + compute + output + runtime
        peak = m["end"]["VmHWM"]
        label = f"ctx {n_ctx}, {n_parallel} par" + "".join(f", {k}" for k in extra)
        components.append(
            f"| {label} | {_pair(plan.weights_bytes, weights)} | {_pair(plan.kv_cache_bytes, kv)} "
            f"| {_pair(plan.compute_bytes, compute)} | {_pair(est_output, output)} | {_pair(est_runtime, runtime)} |"
        )
        totals.append(
            f"| {label} | {_mib(plan.total_bytes)} | {_mib(measured)} | {_err(plan.total_bytes, measured)} "
            f"| {_mib(peak)} | {_err(plan.total_bytes, peak)} | {_mib(repack)} |"
        )
        print(components[-1], totals[-1], sep="\n", file=sys.stderr, flush=True)
    plan = make_plan(info, hw, n_ctx=4096, n_parallel=4)
    default = measure(model, plan, fill=False, n_outputs_max=0)["buffers"]["compute"]
    note = (
        f"With llama.cpp's default `n_outputs_max` (0, meaning n_batch) the ctx 4096, 4 par context reserves "
        f"{_mib(default)} MiB of compute buffer instead of {_mib(plan.compute_bytes)}: room for 512 rows of "
        f"{info.vocab_size} logits. The engine must set `n_outputs_max = n_seq_max`."
    )
    return components, totals, note


def synthetic_table() -> list[str]:
    """KV cache and compute buffer of llama-architecture files of other shapes, estimate against llama.cpp."""
    rows = [
        "| n_embd, n_ff, heads, KV heads, head size, vocab | ctx, parallel | flash | KV cache | compute buffer |",
        "| --- | --- | --- | --- | --- |",
    ]
    hw = detect_hardware()
    with tempfile.TemporaryDirectory() as tmp:
        for shape, n_ctx, n_parallel, flash in SYNTHETIC:
            path = Path(tmp) / ("_".join(map(str, shape)) + ".gguf")
            if not path.exists():
                write_synthetic(path, *shape)
            plan = make_plan(read_gguf(path), hw, n_ctx=n_ctx, n_parallel=n_parallel, flash_attn=flash)
            b = measure(path, plan, fill=False)["buffers"]
            rows.append(
                f"| {', '.join(map(str, shape))} | {n_ctx}, {plan.n_parallel} | {'yes' if flash else 'no'} "
                f"| {_pair(plan.kv_cache_bytes, b['KV'])} | {_pair(plan.compute_bytes, b['compute'])} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def machine() -> str:
    """nproc, CPU model, RAM and OS of this machine, in one line."""
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    ram = psutil.virtual_memory().total / (1 << 30)
    return f"{os.cpu_count()} CPUs ({cpu}), {ram:.1f} GiB RAM, {platform.system()} {platform.release()}"


def document(model: Path, components: list[str], totals: list[str], note: str, synthetic: list[str]) -> str:
    import llama_cpp

    nl = "\n"
    return f"""# Planner estimate against llama.cpp

`python scripts/bench_planner.py --write docs/benchmarks-planner.md` on {machine()};
llama-cpp-python {llama_cpp.__version__} (CPU build), model `{model.name}`.

## The demo model, context filled

Each setting runs in a fresh process that loads the model the way the engine does
(`Plan.model_params()`, `Plan.context_params()`: one context, unified KV cache,
`n_seq_max = n_parallel + 1`, `n_outputs_max = n_seq_max`, flash attention off unless named) and
then fills the whole context with the engine's workload: a shared prefix decoded once and copied to
every sequence, each sequence's suffix, then {GENERATED} tokens generated for all sequences together.
Measured sizes are the buffers llama.cpp logs at load; "runtime + vocabulary" is the RSS after the
model load less the mapped weights and the repacked copies (Python with the appliance's modules and
llama_cpp, the vocabulary), estimated as {RUNTIME_BYTES // MiB} MiB plus {VOCAB_BYTES_PER_TOKEN} bytes
a vocabulary token.

Components, MiB: estimate / measured (error of the estimate).

{nl.join(components)}

Totals, MiB. The estimate also counts the CPU backend's work buffer, which llama.cpp does not
report; the peak RSS (VmHWM, after the context is full) includes the CPU_REPACK copies, which the
estimate leaves out because they replace mmap'd weight pages the kernel is then free to drop.

{nl.join(totals)}

Weights, KV cache and output buffer match to the byte: they follow llama.cpp's allocation rules
(n_ctx padded to 256; sliding-window layers get `GGML_PAD(min(n_ctx, n_swa * n_seq_max + n_ubatch), 256)`
cells unless `swa_full`). The compute buffer comes from a model of llama.cpp's graph peak, fitted to
the sizes it reports and kept above them. {note}

## Other shapes, load only

Two-layer llama-architecture files of zero weights, written by the script, loaded with the plan's
parameters; MiB, estimate / llama.cpp (error).

{nl.join(synthetic)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a .gguf file (default: the demo model)")
    parser.add_argument("--write", type=Path, help="also write the tables into this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    model = args.model or demo_model_path()
    if model is None:
        raise SystemExit("no --model and the demo model package is not installed")
    components, totals, note = demo_tables(model)
    synthetic = synthetic_table()
    text = document(model, components, totals, note, synthetic)
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
