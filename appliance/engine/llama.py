"""llama.cpp plumbing shared by the engine and the code that prepares its work: the captured log (so the
appliance prints its own one-line errors), a vocabulary loaded without weights, tokenizing, and the
common-prefix rule the planner and the engine agree on; plus the decode-only rate the benchmarks
compare the engine with.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GenerationError

if TYPE_CHECKING:
    from .engine import Engine

_LOG_LINES: list[str] = []
_log_callback = None  # keeps the ctypes callback alive


def _install_log_capture() -> None:
    """Route llama.cpp's log into a buffer (and to stderr with APPLIANCE_DEBUG=1): the appliance prints
    its own one-line messages."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    debug = bool(os.environ.get("APPLIANCE_DEBUG"))

    @llama_cpp.llama_log_callback
    def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        _LOG_LINES.append(text.decode("utf-8", errors="replace"))
        if debug:
            sys.stderr.write(_LOG_LINES[-1])
        if len(_LOG_LINES) > 2000:
            del _LOG_LINES[:1000]

    _log_callback = _capture
    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))


def _last_error_line() -> str:
    for line in reversed("".join(_LOG_LINES).splitlines()):
        if "error" in line.lower() or "failed" in line.lower():
            return line.strip()
    return ""


def reset_log() -> None:
    """Forget earlier llama.cpp log lines: an error message must only quote what this call logged."""
    _LOG_LINES.clear()


class Vocab:
    """A model's tokenizer without its weights (llama.cpp's vocab_only load): for counting tokens
    before the planner decides how the model is loaded."""

    def __init__(self, model_path: str | Path) -> None:
        import llama_cpp

        self._ll = llama_cpp
        _install_log_capture()
        reset_log()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            detail = _last_error_line()
            raise GenerationError(f"llama.cpp could not read the vocabulary of {model_path}" + (f": {detail}" if detail else ""))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self.vocab, text)

    def count(self, text: str) -> int:
        """Tokens in `text` as a continuation (no BOS)."""
        return len(_tokenize(self.vocab, text, add_special=False))

    def close(self) -> None:
        if self.model:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Vocab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_prompt_tokens(model_path: str | Path, prompts: Sequence[str]) -> tuple[int, int]:
    """(shared prefix tokens, longest per-prompt remainder) for these prompts: what the planner needs
    to size the context."""
    return prompt_shapes(model_path, [prompts])[0]


def prompt_shapes(model_path: str | Path, prompt_lists: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """count_prompt_tokens for each list of prompts, with one vocabulary load (~0.3 s for 262k tokens)."""
    out = []
    with Vocab(model_path) as vocab:
        for prompts in prompt_lists:
            toks = [vocab.tokenize(text) for text in prompts]
            prefix = _common_prefix(toks)
            out.append((prefix, max(len(t) for t in toks) - prefix))
    return out


def _tokenize(vocab: Any, text: str, add_special: bool = True) -> list[int]:
    """Tokens of `text` (with the model's BOS unless add_special is False), special tokens parsed
    (prompt files may use them)."""
    import llama_cpp

    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, True)
    if n < 0:
        n_max = -n
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, True)
    return list(buf[:n])


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own
    (its last prompt token must be decoded in its own sequence to get its first logits)."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def decode_only_rate(engine: Engine, prompts: Sequence[str], n: int, new_tokens: int) -> dict[str, float]:
    """The kernel's ceiling for this engine: `n` sequences (prompts reused in turn) decoded as the
    engine decodes them (shared prefix once, copied; suffixes batched), then `new_tokens` steps of one
    token per sequence with no sampling at all (each feeds its last token again). Returns
    {"tok_s": generated tokens per second of the steps, "prompt_s": seconds of the prompt part, ...}."""
    ll = engine._ll
    if not prompts or n < 1 or new_tokens < 1:
        raise GenerationError("decode_only_rate needs prompts, n >= 1 and new_tokens >= 1")
    if n > engine.holder:
        raise GenerationError(f"decode_only_rate: n={n} is more than the plan's {engine.holder} parallel sequences")
    toks = [engine.tokenize(prompts[i % len(prompts)]) for i in range(n)]
    prefix = _common_prefix(toks)
    need = prefix + sum(len(t) - prefix + new_tokens for t in toks)
    if need > engine.n_ctx:
        raise GenerationError(f"decode_only_rate needs {need} tokens of context, but the plan gives {engine.n_ctx}")
    ll.llama_memory_clear(engine.mem, True)
    start = time.perf_counter()
    engine._decode_prefix(toks[0][:prefix])
    rows = [(seq, t[prefix:]) for seq, t in enumerate(toks)]
    for seq, _ in rows:
        if prefix:
            ll.llama_memory_seq_cp(engine.mem, engine.holder, seq, -1, -1)
    flat = [(seq, prefix + j, tok, j == len(rest) - 1) for seq, rest in rows for j, tok in enumerate(rest)]
    for at in range(0, len(flat), engine.n_batch):
        engine._batch_clear()
        for seq, pos, tok, logits in flat[at : at + engine.n_batch]:
            engine._batch_add(tok, pos, seq, logits)
        engine._decode_or_raise()
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(new_tokens):
        engine._batch_clear()
        for seq, t in enumerate(toks):
            engine._batch_add(t[-1], len(t) + step, seq, True)
        engine._decode_or_raise()
    gen_s = time.perf_counter() - start
    ll.llama_memory_clear(engine.mem, True)
    return {
        "n": n,
        "tok_s": n * new_tokens / gen_s,
        "tok_s_with_prompt": n * new_tokens / (gen_s + prompt_s),
        "prompt_s": prompt_s,
        "gen_s": gen_s,
        "prompt_tokens": prefix + sum(len(t) - prefix for t in toks),
    }
