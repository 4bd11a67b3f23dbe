"""llama.cpp plumbing shared by the engine and the code that prepares its work: the captured log (so the
appliance prints its own one-line errors), a vocabulary loaded without weights, tokenizing, and the
common-prefix rule the planner and the engine agree on.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import GenerationError

_LOG_LINES: list[str] = []
_PENDING_INTERRUPT = [False]  # a Ctrl-C that landed in the log callback, raised by raise_pending_interrupt
_log_callback = None  # keeps the ctypes callback alive


def install_log_capture() -> None:
    """Route llama.cpp's log into a buffer (and to stderr with APPLIANCE_DEBUG=1): the appliance prints
    its own one-line messages."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    debug = bool(os.environ.get("APPLIANCE_DEBUG"))

    @llama_cpp.llama_log_callback
    def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            _LOG_LINES.append(text.decode("utf-8", errors="replace"))
            if debug:
                sys.stderr.write(_LOG_LINES[-1])
            if len(_LOG_LINES) > 2000:
                del _LOG_LINES[:1000]
        except KeyboardInterrupt:  # Ctrl-C arrived while llama.cpp called back: ctypes would print and drop it
            _PENDING_INTERRUPT[0] = True

    _log_callback = _capture
    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))


def raise_pending_interrupt() -> None:
    """Raise the Ctrl-C (or SIGTERM) that arrived while llama.cpp was calling back into Python, where ctypes
    cannot pass an exception on; called after each llama.cpp call that logs (loads, decodes)."""
    if _PENDING_INTERRUPT[0]:
        _PENDING_INTERRUPT[0] = False
        raise KeyboardInterrupt


def last_error_line() -> str:
    for line in reversed("".join(_LOG_LINES).splitlines()):
        if "error" in line.lower() or "failed" in line.lower():
            return line.strip()
    return ""


def reset_log() -> None:
    """Forget earlier llama.cpp log lines: an error message must only quote what this call logged."""
    _LOG_LINES.clear()


def load_model(model_path: str | Path, model_params: dict[str, Any], *, failed: str | None = None,
               hint: str = " (check the file with `appliance models inspect`, or try a smaller --gpu-layers)") -> Any:
    """A llama.cpp model loaded with these model parameters (a plan's, or vocab_only); one error line when it
    cannot be: `failed` (default "llama.cpp could not load PATH"), llama.cpp's own last error, `hint`."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    for key, value in model_params.items():
        setattr(mparams, key, value)
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    raise_pending_interrupt()
    if not model:
        detail = last_error_line()
        raise GenerationError((failed or f"llama.cpp could not load {model_path}") + (f": {detail}" if detail else "") + hint)
    return model


def new_context(model: Any, context_params: dict[str, Any]) -> Any:
    """A context on `model` with these context parameters (a plan's); one error line when it cannot be made."""
    import llama_cpp

    cparams = llama_cpp.llama_context_default_params()
    for key, value in context_params.items():
        setattr(cparams, key, value)
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    raise_pending_interrupt()
    if not ctx:
        detail = last_error_line()
        raise GenerationError("llama.cpp could not create a context" + (f": {detail}" if detail else "")
                              + " (try a smaller --ctx or --parallel)")
    return ctx


class Pieces:
    """A vocabulary's token -> bytes, cached (the engine appends each sampled token's piece to its output)."""

    def __init__(self, vocab: Any) -> None:
        import llama_cpp

        self._ll, self.vocab = llama_cpp, vocab
        self._buf = ctypes.create_string_buffer(256)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        n = self._ll.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:
            self._buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
        self._cache[token] = piece = self._buf.raw[:n]
        return piece


class Vocab:
    """A model's tokenizer without its weights (llama.cpp's vocab_only load): for counting tokens
    before the planner decides how the model is loaded."""

    def __init__(self, model_path: str | Path) -> None:
        import llama_cpp

        self._ll = llama_cpp
        install_log_capture()
        reset_log()
        self.model = load_model(model_path, {"vocab_only": True},
                                failed=f"llama.cpp could not read the vocabulary of {model_path}", hint="")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.vocab, text)

    def count(self, text: str) -> int:
        """Tokens in `text` as a continuation (no BOS)."""
        return len(tokenize(self.vocab, text, add_special=False))

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
            prefix = common_prefix(toks)
            out.append((prefix, max(len(t) for t in toks) - prefix))
    return out


def tokenize(vocab: Any, text: str, add_special: bool = True) -> list[int]:
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


def common_prefix(seqs: list[list[int]]) -> int:
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
