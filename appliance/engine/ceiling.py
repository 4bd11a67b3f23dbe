"""The decode-only ceiling the benchmarks compare the engine with: the same prompts decoded as the engine
decodes them (the shared prefix once, copied to every sequence; suffixes batched), then token steps with
no sampling at all (each sequence feeds its last token again)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import GenerationError
from .engine import Engine
from .llama import common_prefix


def decode_only_rate(engine: Engine, prompts: Sequence[str], n: int, new_tokens: int) -> dict[str, Any]:
    """`n` sequences (prompts reused in turn) decoded as the engine decodes them, then `new_tokens` steps of one
    token per sequence. Returns {"tok_s": generated tokens per second of the steps, "tok_s_with_prompt",
    "prefix_s" and "suffix_s" (seconds of the shared prefix and of the suffixes), "prompt_s" (both), "gen_s",
    "prompt_tokens"}."""
    import llama_cpp as ll

    if not prompts or n < 1 or new_tokens < 1:
        raise GenerationError("decode_only_rate needs prompts, n >= 1 and new_tokens >= 1")
    if n > engine.holder:
        raise GenerationError(f"decode_only_rate: n={n} is more than the plan's {engine.holder} parallel sequences")
    toks = [engine.tokenize(prompts[i % len(prompts)]) for i in range(n)]
    prefix = common_prefix(toks)
    need = prefix + sum(len(t) - prefix + new_tokens for t in toks)
    if need > engine.n_ctx:
        raise GenerationError(f"decode_only_rate needs {need} tokens of context, but the plan gives {engine.n_ctx}")
    batch, stats = engine.batch, engine.last
    ll.llama_memory_clear(engine.mem, True)
    start = time.perf_counter()
    engine.decode_prefix(toks[0][:prefix])
    prefix_s = time.perf_counter() - start
    start = time.perf_counter()
    for seq in range(n):
        if prefix:
            ll.llama_memory_seq_cp(engine.mem, engine.holder, seq, -1, -1)
    flat = [(seq, prefix + j, tok, j == len(t) - prefix - 1) for seq, t in enumerate(toks) for j, tok in enumerate(t[prefix:])]
    for at in range(0, len(flat), engine.n_batch):
        batch.clear()
        for seq, pos, tok, logits in flat[at : at + engine.n_batch]:
            batch.add(tok, pos, seq, logits)
        batch.decode_or_raise(stats)
    suffix_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(new_tokens):
        batch.clear()
        for seq, t in enumerate(toks):
            batch.add(t[-1], len(t) + step, seq, True)
        batch.decode_or_raise(stats)
    gen_s = time.perf_counter() - start
    ll.llama_memory_clear(engine.mem, True)
    prompt_s = prefix_s + suffix_s
    return {
        "n": n,
        "tok_s": n * new_tokens / gen_s,
        "tok_s_with_prompt": n * new_tokens / (gen_s + prompt_s),
        "prefix_s": prefix_s,
        "suffix_s": suffix_s,
        "prompt_s": prompt_s,
        "gen_s": gen_s,
        "prompt_tokens": prefix + sum(len(t) - prefix for t in toks),
    }
