"""The engine: one llama.cpp model and context in this process, many sequences advanced per decode call.

Bulk data generation is many short outputs behind one long shared prompt prefix, so the engine
  1. tokenizes every prompt and finds their longest common token prefix,
  2. decodes that prefix once into a holder sequence,
  3. runs up to `n_parallel` sequences at once: each starts as a copy of the holder's KV cells
     (`llama_memory_seq_cp`), then its own suffix and its sampled tokens go into the same
     `llama_decode` batch as every other running sequence's next token (continuous batching: a
     finished sequence's slot is refilled at once),
  4. samples each sequence with its own sampler chain and seed (and grammar, for JSON schemas).

Outputs come back as they finish. The KV cache is unified (all sequences share its cells), so the
context the plan gives is prefix + n_parallel x (suffix + max_tokens).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .errors import GenerationError

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


class SamplingParams(BaseModel):
    """How each sequence picks its tokens. temperature 0 means greedy."""

    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    max_tokens: int = Field(128, gt=0)
    stop: list[str] = Field(default_factory=list)


@dataclass
class Request:
    key: Any
    prompt: str
    seed: int
    grammar: str | None = None  # GBNF for this request; else the engine's


@dataclass
class Completion:
    key: Any
    seed: int
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str  # eos | stop | length
    ms: int
    parallel: int  # sequences decoding together when this one finished


@dataclass
class EngineStats:
    decode_calls: int = 0
    prompt_tokens: int = 0  # tokens decoded for prompts (the shared prefix counted once)
    completion_tokens: int = 0
    shared_prefix_tokens: int = 0
    decode_seconds: float = 0.0
    retries: list[str] = field(default_factory=list)  # decode failures that shrank the batch


@dataclass
class _Slot:
    seq: int
    request: Request | None = None
    tokens: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode
    pos: int = 0
    n_out: int = 0
    out: bytearray = field(default_factory=bytearray)
    sampler: Any = None
    started: float = 0.0
    last: int | None = None  # sampled token to feed next
    finish: str | None = None  # set to "eos" when the model ends the sequence


class Engine:
    """A loaded model with a context shaped by a plan (`appliance.planner.Plan`).

    One Engine per process; never share it across threads.
    """

    def __init__(self, model_path: str | Path, plan: Any, *, grammar: str | None = None) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self.plan = plan
        self.grammar = grammar
        self.model = self.ctx = None
        self.batch = None
        self.stats = EngineStats()
        _install_log_capture()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        for key, value in plan.model_params().items():
            setattr(mparams, key, value)
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            detail = _last_error_line()
            raise GenerationError(
                f"llama.cpp could not load {model_path}" + (f": {detail}" if detail else "")
                + " (check the file with `appliance models inspect`, or try a smaller --gpu-layers)"
            )
        self.holder = int(plan.n_parallel)  # the extra sequence (plan.n_seq_max = n_parallel + 1) holding the prefix
        cparams = llama_cpp.llama_context_default_params()
        for key, value in plan.context_params().items():
            setattr(cparams, key, value)
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            detail = _last_error_line()
            self.close()
            raise GenerationError(
                "llama.cpp could not create a context" + (f": {detail}" if detail else "")
                + " (try a smaller --ctx or --parallel)"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = int(plan.n_batch)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)

    # -- text <-> tokens ------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self.vocab, text)

    def piece(self, token: int) -> bytes:
        n = self._ll.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    # -- sampling -------------------------------------------------------------------------------
    def _make_sampler(self, params: SamplingParams, seed: int, grammar: str | None) -> Any:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if grammar:
            g = ll.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
            if not g:
                ll.llama_sampler_free(chain)
                raise GenerationError("llama.cpp rejected the output grammar (see `APPLIANCE_DEBUG=1` for its log)")
            ll.llama_sampler_chain_add(chain, g)
        if params.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(64, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[Request],
        params: SamplingParams,
        *,
        n_parallel: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Iterator[Completion]:
        """Yield one Completion per request, in the order they finish.

        `on_step(tokens)` is called after every decode with the completion tokens it produced.
        """
        if not requests:
            return
        toks = [self.tokenize(r.prompt) for r in requests]
        prefix = _common_prefix(toks)
        longest = max(len(t) for t in toks)
        need_one = longest + params.max_tokens
        n_par = max(1, min(n_parallel or self.holder, self.holder, len(requests)))
        while n_par > 1 and prefix + n_par * (longest - prefix + params.max_tokens) > self.n_ctx:
            n_par -= 1
        if need_one > self.n_ctx:
            raise GenerationError(
                f"a prompt of {longest} tokens plus --max-tokens {params.max_tokens} needs {need_one} tokens of "
                f"context, but the plan gives {self.n_ctx} (use a larger --ctx or a smaller --max-tokens)"
            )
        ll = self._ll
        ll.llama_memory_clear(self.mem, True)
        self._decode_prefix(toks[0][:prefix])
        self.stats.shared_prefix_tokens = prefix

        queue = deque(range(len(requests)))
        slots = [_Slot(seq=i) for i in range(n_par)]
        try:
            while queue or any(s.request for s in slots):
                for slot in slots:
                    if slot.request is None and queue:
                        i = queue.popleft()
                        self._start(slot, requests[i], toks[i], prefix, params)
                produced = self._step(slots, queue, requests, toks, prefix, params)
                if on_step:
                    on_step(produced)
                for slot in slots:
                    done = self._finished(slot, params)
                    if done:
                        active = sum(1 for s in slots if s.request is not None)
                        yield Completion(
                            key=slot.request.key,
                            seed=slot.request.seed,
                            text=done[0],
                            tokens_in=len(slot.tokens),
                            tokens_out=slot.n_out,
                            finish_reason=done[1],
                            ms=int((time.perf_counter() - slot.started) * 1000),
                            parallel=active,
                        )
                        self._release(slot)
        finally:
            for slot in slots:
                self._release(slot)

    def _decode_prefix(self, prefix: list[int]) -> None:
        for start in range(0, len(prefix), self.n_batch):
            chunk = prefix[start : start + self.n_batch]
            self._batch_clear()
            for j, tok in enumerate(chunk):
                self._batch_add(tok, start + j, self.holder, False)
            self._decode_or_raise()
            self.stats.prompt_tokens += len(chunk)

    def _start(self, slot: _Slot, request: Request, tokens: list[int], prefix: int, params: SamplingParams) -> None:
        ll = self._ll
        ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        if prefix:
            ll.llama_memory_seq_cp(self.mem, self.holder, slot.seq, -1, -1)
        slot.request, slot.tokens = request, tokens
        slot.pending = tokens[prefix:]
        slot.pos, slot.n_out, slot.out, slot.last = prefix, 0, bytearray(), None
        slot.sampler = self._make_sampler(params, request.seed, request.grammar or self.grammar)
        slot.started = time.perf_counter()
        slot.finish = None

    def _release(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            self._ll.llama_sampler_free(slot.sampler)
        slot.sampler, slot.request, slot.finish = None, None, None

    def _step(self, slots, queue, requests, toks, prefix, params) -> int:
        """Put every running sequence's next token and as much pending prompt as fits in one batch; decode;
        sample. A decode that finds no room in the KV cache shrinks the batch and retries."""
        while True:
            self._batch_clear()
            outputs: list[tuple[_Slot, int]] = []
            fed: list[tuple[_Slot, int, int]] = []  # slot, first pos fed, tokens fed from pending
            for slot in slots:
                if slot.request is not None and slot.last is not None:
                    outputs.append((slot, self._batch_add(slot.last, slot.pos, slot.seq, True)))
                    fed.append((slot, slot.pos, 0))
            room = self.n_batch - len(outputs)
            for slot in slots:
                if slot.request is None or not slot.pending or room <= 0:
                    continue
                chunk = slot.pending[:room]
                last_chunk = len(chunk) == len(slot.pending)
                for j, tok in enumerate(chunk):
                    idx = self._batch_add(tok, slot.pos + j, slot.seq, last_chunk and j == len(chunk) - 1)
                if last_chunk:
                    outputs.append((slot, idx))
                fed.append((slot, slot.pos, len(chunk)))
                room -= len(chunk)
            ret = self._decode()
            if ret == 0:
                break
            if ret == 1 and sum(1 for s in slots if s.request is not None) > 1:
                # No KV slot for this batch: roll back what it placed, hand the newest sequence back to the queue.
                for slot, pos, _ in fed:
                    self._ll.llama_memory_seq_rm(self.mem, slot.seq, pos, -1)
                victim = max((s for s in slots if s.request is not None), key=lambda s: s.started)
                queue.appendleft(next(i for i, r in enumerate(requests) if r is victim.request))
                self._ll.llama_memory_seq_rm(self.mem, victim.seq, -1, -1)
                self._release(victim)
                slots.remove(victim)
                self.stats.retries.append(f"decode found no KV room for {len(slots) + 1} sequences; retried with {len(slots)}")
                continue
            raise GenerationError(
                f"llama_decode failed (code {ret})" + (f": {_last_error_line()}" if _last_error_line() else "")
                + " (try a smaller --parallel or --ctx)"
            )
        for slot, pos, n in fed:
            if n:
                slot.pending = slot.pending[n:]
                slot.pos += n
                self.stats.prompt_tokens += n
            else:
                slot.pos += 1
        produced = 0
        for slot, idx in outputs:
            tok = self._ll.llama_sampler_sample(slot.sampler, self.ctx, idx)
            produced += 1
            slot.n_out += 1
            if self._ll.llama_vocab_is_eog(self.vocab, tok):
                slot.finish = "eos"
                slot.last = None
                continue
            slot.out += self.piece(tok)
            slot.last = tok
        self.stats.completion_tokens += produced
        return produced

    def _finished(self, slot: _Slot, params: SamplingParams) -> tuple[str, str] | None:
        if slot.request is None:
            return None
        if slot.finish == "eos":
            return slot.out.decode("utf-8", errors="replace"), "eos"
        if slot.last is None:
            return None
        text = slot.out.decode("utf-8", errors="ignore")
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                return text[:at], "stop"
        if slot.n_out >= params.max_tokens:
            return slot.out.decode("utf-8", errors="replace"), "length"
        return None

    # -- batch plumbing -------------------------------------------------------------------------
    def _batch_clear(self) -> None:
        self.batch.n_tokens = 0

    def _batch_add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.batch, self.batch.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def _decode(self) -> int:
        start = time.perf_counter()
        ret = self._ll.llama_decode(self.ctx, self.batch)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_calls += 1
        return ret

    def _decode_or_raise(self) -> None:
        ret = self._decode()
        if ret != 0:
            raise GenerationError(f"llama_decode failed on the shared prompt prefix (code {ret}); try a smaller --ctx")

    def close(self) -> None:
        ll = self._ll
        if self.batch is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vocab:
    """A model's tokenizer without its weights (llama.cpp's vocab_only load): for counting tokens
    before the planner decides how the model is loaded."""

    def __init__(self, model_path: str | Path) -> None:
        import llama_cpp

        self._ll = llama_cpp
        _install_log_capture()
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
    with Vocab(model_path) as vocab:
        toks = [vocab.tokenize(text) for text in prompts]
    prefix = _common_prefix(toks)
    return prefix, max(len(t) for t in toks) - prefix


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
