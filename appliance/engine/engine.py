"""The engine: one llama.cpp model and context in this process, many sequences advanced per decode call.

Bulk data generation is many short outputs behind one long shared prompt prefix, so the engine
  1. tokenizes every prompt and finds their longest common token prefix,
  2. decodes that prefix once into a holder sequence,
  3. runs up to `n_parallel` sequences at once: each starts as a copy of the holder's KV cells
     (`llama_memory_seq_cp`), then its own suffix and its sampled tokens go into the same
     `llama_decode` batch as every other running sequence's next token (continuous batching: a
     finished sequence's slot is refilled at once); requests with identical prompts (k samples of
     one input) decode that prompt once and copy its cells, and a prompt that begins like one a
     sequence holds (the same task's instructions before a different input) copies those cells and
     decodes only the rest (prompts run in token order, so prompts that begin alike run together),
  4. samples each sequence with its own sampler chain and seed; a grammar (appliance.grammar) checks
     only the sampled token, masks the logits only when it rejects it, and appends the tokens it
     forces without sampling them (they are decoded with everyone else's next tokens).

Sampling reads each step's logits as one numpy matrix: greedy is a row's argmax, and a chain that
starts with top-k is given only the row's top candidates (llama_sampler_sample would copy all n_vocab
logits per sequence per step); the same seed draws the same tokens either way.

Outputs come back as they finish. The KV cache is unified (all sequences share its cells), so the
context the plan gives is prefix + n_parallel x (suffix + max_tokens).
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import GenerationError
from .types import Completion, EngineStats, Request, SamplingParams, greedy_twins
from .llama import Pieces, common_prefix, install_log_capture, last_error_line, load_model, new_context, reset_log, tokenize
from .batch import Batch
from .grammar import Constrainer, Constraint, Grammar, GrammarError, as_grammar
from .sampling import Sampler
from .slots import Slot, shared_start, worth

FORCED_MAX = 64  # forced tokens appended per step at most (they must fit one batch with everyone else's)


class Engine:
    """A loaded model with a context shaped by a plan (`appliance.planner.Plan`).

    One Engine per process; never share it across threads. generate() may be called any number of
    times, one at a time (each call starts from an empty KV cache); `last` counts the latest call,
    `stats` all of them.
    """

    def __init__(self, model_path: str | Path, plan: Any, *, grammar: Grammar | str | None = None) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self.plan = plan
        self.model = self.ctx = None
        self.batch = None
        self._grammars: dict[str, Grammar | None] = {}
        self.grammar = self._grammar(grammar)
        self.stats = EngineStats()  # this engine's life (model loads included)
        self.last = EngineStats()  # the latest generate() call
        install_log_capture()
        reset_log()
        start = time.perf_counter()
        self.model = load_model(model_path, plan.model_params())
        self.holder = int(plan.n_parallel)  # the extra sequence (plan.n_seq_max = n_parallel + 1) holding the prefix
        try:
            self.ctx = new_context(self.model, plan.context_params())
        except GenerationError:
            self.close()
            raise
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = int(plan.n_batch)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = Batch(llama_cpp, self.ctx, self.n_batch)
        self.piece = Pieces(self.vocab)  # token -> its bytes
        self._produced = 0  # output tokens appended outside a sampling step (forced at a sequence's start)
        self.fast_sampling = True  # False: every token through llama_sampler_sample (for comparisons)
        self.sampling = Sampler(llama_cpp, self.ctx, self.vocab, self.n_vocab)
        self._constrainer = Constrainer(self.vocab)
        # A sequence's cells [0, n) can be copied to another while no sliding-window layer has dropped any of
        # them: always with full SWA cells or without SWA layers, else while the donor is short of the window.
        n_swa = llama_cpp.llama_model_n_swa(self.model)
        self._reuse_cells = True  # generate(share_prompts=False) turns every kind of prompt sharing off
        self._reuse_limit = n_swa if n_swa > 0 and not getattr(plan, "swa_full", False) else 1 << 62
        self.stats.model_loads = 1
        self.stats.load_seconds = time.perf_counter() - start

    # -- text <-> tokens ------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokens of a prompt; with add_bos False the text is taken as it is (a chat-rendered prompt
        carries its own BOS text, parsed as the BOS token)."""
        return tokenize(self.vocab, text, add_special=add_bos)

    def _prompt_tokens(self, request: Request) -> list[int]:
        if request.tokens is not None:
            return list(request.tokens)
        toks = self.tokenize(request.prompt, request.add_bos)
        bos = self._ll.llama_vocab_bos(self.vocab)
        if len(toks) >= 2 and toks[0] == toks[1] == bos:  # the BOS token added and the BOS text parsed
            del toks[0]
        return toks

    def _grammar(self, value: Grammar | str | None) -> Grammar | None:
        """A request's grammar, GBNF text converted once per engine (every item of a task passes the same)."""
        if not isinstance(value, str):
            return as_grammar(value)
        if value not in self._grammars:
            self._grammars[value] = as_grammar(value)
        return self._grammars[value]

    # -- sampling -------------------------------------------------------------------------------
    def _sample(self, slot: Slot, idx: int, row: Any) -> int:
        """Sample with the sequence's own chain; a grammar checks only the token drawn, and only when it
        rejects it are the logits masked and the token drawn again (as llama.cpp's common_sampler_sample
        does: the same distribution as sampling from the masked logits)."""
        ll = self._ll
        tok = self.sampling.draw(slot.sampler, slot.fast, slot.params, idx, row)
        c = slot.constraint
        if c is not None and not c.allows(tok, ll.llama_vocab_is_eog(self.vocab, tok)):
            self.last.grammar_resamples += 1
            if c.mask_logits(row) == 0:
                raise GrammarError("the output grammar allows no token here (a grammar that can never end?)")
            tok = self.sampling.draw(slot.sampler, slot.fast, slot.params, idx, row)
            if not c.allows(tok, ll.llama_vocab_is_eog(self.vocab, tok)):  # a chain that kept only -inf candidates
                tok = int(row.argmax())
        if slot.fast:
            ll.llama_sampler_accept(slot.sampler, tok)
        return tok

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[Request],
        params: SamplingParams | None = None,
        *,
        n_parallel: int | None = None,
        on_step: Callable[[int], None] | None = None,
        share_prompts: bool = True,
    ) -> Iterator[Completion]:
        """Yield one Completion per request, in the order they finish.

        `params` applies to requests without their own. Requests with identical prompt tokens (e.g. k
        samples of one input) decode that prompt once with `share_prompts` (the others copy its KV
        cells). `on_step(tokens)` is called after every decode with the completion tokens it produced.
        """
        if not requests:
            return
        reset_log()
        self._produced = 0
        self.last = EngineStats()
        default = params or SamplingParams()
        leaders, twins = greedy_twins(requests, default)
        try:
            if not twins:
                yield from self._generate(requests, default, n_parallel, on_step, share_prompts)
                return
            batch = [replace(requests[i], key=i) for i in leaders]  # keys become indices, to find each one's twins
            for done in self._generate(batch, default, n_parallel, on_step, share_prompts):
                for i in (done.key, *twins.get(done.key, ())):
                    yield replace(done, key=requests[i].key, seed=requests[i].seed)
        finally:
            self.stats.add(self.last)

    def _generate(self, requests, default, n_parallel, on_step, share_prompts) -> Iterator[Completion]:
        params = [r.params or default for r in requests]
        grammars = [self._grammar(r.grammar) if r.grammar is not None else self.grammar for r in requests]
        toks = [self._prompt_tokens(r) for r in requests]
        for i, t in enumerate(toks):
            if not t:
                raise GenerationError(f"request {requests[i].key!r} has an empty prompt")
            need = len(t) + params[i].max_tokens
            if need > self.n_ctx:
                raise GenerationError(
                    f"a prompt of {len(t)} tokens plus --max-tokens {params[i].max_tokens} needs {need} tokens of "
                    f"context, but the plan gives {self.n_ctx} (use a larger --ctx or a smaller --max-tokens)"
                )
        for g in {g for g in grammars if g is not None and g.kind == "llguidance"}:
            self._constraint(g)  # compile each grammar once now: a bad one fails before any decoding
        prefix = common_prefix(toks)
        longest = max(len(t) for t in toks)
        max_new = max(p.max_tokens for p in params)
        n_par = max(1, min(n_parallel or self.holder, self.holder, len(requests)))
        while n_par > 1 and prefix + n_par * (longest - prefix + max_new) > self.n_ctx:
            n_par -= 1
        self._reuse_cells = share_prompts
        ll = self._ll
        ll.llama_memory_clear(self.mem, True)
        self.decode_prefix(toks[0][:prefix])
        self.last.shared_prefix_tokens = prefix

        queue = deque(sorted(range(len(requests)), key=lambda i: toks[i]))  # prompts that begin alike run one after another, to share cells
        slots = [Slot(seq=i) for i in range(n_par)]
        try:
            while queue or any(s.request for s in slots):
                for slot in slots:
                    if slot.request is None and queue:
                        i = queue.popleft()
                        self._start(slot, slots, i, requests[i], toks[i], prefix, params[i], grammars[i])
                produced = self._step(slots, queue, prefix)
                if on_step:
                    on_step(produced)
                for slot in slots:
                    done = self._finished(slot)
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

    def _constraint(self, grammar: Grammar) -> Constraint:
        before = self._constrainer.init_seconds
        c = self._constrainer.constraint(grammar)
        self.last.grammar_init_seconds += self._constrainer.init_seconds - before
        return c

    def decode_prefix(self, prefix: list[int]) -> None:
        for start in range(0, len(prefix), self.n_batch):
            chunk = prefix[start : start + self.n_batch]
            self.batch.clear()
            for j, tok in enumerate(chunk):
                self.batch.add(tok, start + j, self.holder, False)
            self.batch.decode_or_raise(self.last)
            self.last.prompt_tokens += len(chunk)

    def _start(self, slot: Slot, slots: list[Slot], index: int, request: Request, tokens: list[int], prefix: int,
               params: SamplingParams, grammar: Grammar | None) -> None:
        import numpy as np

        ll = self._ll
        ids = np.asarray(tokens, dtype=np.int64)
        start, donor = self._reusable(slot, slots, ids, prefix)
        if donor is slot:  # its previous prompt began the same way: keep those cells
            ll.llama_memory_seq_rm(self.mem, slot.seq, start, -1)
        else:
            ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            if donor is not None:
                ll.llama_memory_seq_cp(self.mem, donor.seq, slot.seq, 0, start)
            elif prefix:
                ll.llama_memory_seq_cp(self.mem, self.holder, slot.seq, -1, -1)
        self.last.shared_prompt_tokens += start - prefix
        slot.request, slot.index, slot.params, slot.tokens, slot.ids = request, index, params, tokens, ids
        slot.pending = tokens[start:]
        slot.pos, slot.n_out, slot.out, slot.feed = start, 0, bytearray(), []
        gbnf = grammar.text if grammar and grammar.kind == "gbnf" else None
        slot.sampler = self.sampling.chain(params, request.seed, gbnf)
        slot.fast = self.fast_sampling and gbnf is None
        slot.constraint = self._constraint(grammar) if grammar and grammar.kind == "llguidance" else None
        slot.prompt_left = len(slot.pending)
        slot.finish = None
        if slot.constraint is not None:  # what the grammar forces before anything is sampled goes with the prompt
            forced = self._force(slot)
            slot.pending = slot.pending + forced
            self._produced += len(forced)
            self.last.completion_tokens += len(forced)
            if slot.finish:
                slot.pending = []
        slot.waiting = False
        if not slot.finish:
            self._wait_for_donor(slot, slots, start)
        slot.started = time.perf_counter()

    def _reusable(self, slot: Slot, slots: list[Slot], ids: Any, prefix: int) -> tuple[int, Slot | None]:
        """The longest start of `tokens` beyond the shared prefix whose cells a sequence holds (a running one,
        or one that finished and keeps its cells until its slot is reused, this slot included), and that
        sequence; (prefix, None) when none shares at least REUSE_MIN more tokens. Prompts that share a
        task's instructions but not every prompt's prefix (two tasks, several prompt forms) decode them once."""
        if not self._reuse_cells:
            return prefix, None
        best, donor = prefix, None
        last = len(ids) - 1  # the last prompt token is always decoded: its logits give the first output
        for s in slots:
            if s.ids is None or s.waiting or (s.request is None and s is not slot and s.pos == 0):
                continue
            held = min(s.pos, len(s.ids), last)  # cells [0, held) hold s's prompt tokens
            if held <= best or s.pos >= self._reuse_limit:
                continue
            n = shared_start(s.ids, ids, held)
            if n > best and worth(n, prefix, last):
                best, donor = n, s
        return best, donor

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self._ll.llama_sampler_free(slot.sampler)
        slot.sampler, slot.request, slot.constraint, slot.finish = None, None, None, None
        slot.feed, slot.pending, slot.waiting, slot.donor, slot.donor_request = [], [], False, None, None

    def _wait_for_donor(self, slot: Slot, slots: list[Slot], start: int) -> None:
        """When a running sequence is about to decode more of this prompt's first tokens than any sequence
        holds (the same prompt: k samples of one input; the same instructions: the first wave of a task),
        wait for it instead of decoding them a second time in the same batch."""
        if not self._reuse_cells:
            return
        last = len(slot.tokens) - 1
        best, donor = start, None
        for s in slots:
            if s is slot or s.request is None or s.waiting or s.finish is not None:
                continue
            ahead = min(len(s.tokens), last)  # the prompt cells s will hold once its prompt is decoded
            if ahead <= best or s.pos >= ahead:  # (a donor that already holds them was taken by _reusable)
                continue
            n = shared_start(s.ids, slot.ids, ahead)
            if n > best and worth(n, start, last):
                best, donor = n, s
        if donor is not None:
            slot.waiting, slot.donor, slot.donor_request, slot.share = True, donor, donor.request, best

    def _share(self, slots: list[Slot]) -> None:
        """Sequences waiting for a donor: copy its cells [0, share) once it has decoded them, and decode only
        the rest of the prompt themselves. When the donor stopped first (it ended, was handed back, or its
        grammar forced it to the end after one step, as a one-token label does), copy what any sequence holds
        of the prompt now (the stopped donor's slot keeps its cells, and its next prompt often begins alike)
        and wait for another donor or decode the rest."""
        for slot in slots:
            if slot.request is None or not slot.waiting:
                continue
            donor, n = slot.donor, slot.share
            if donor.request is not slot.donor_request or donor.waiting or (donor.finish is not None and donor.pos < n):
                slot.waiting, slot.donor, slot.donor_request = False, None, None
                start, other = self._reusable(slot, slots, slot.ids, slot.pos)
                if other is not None:
                    self._take_cells(slot, other, start)
                self._wait_for_donor(slot, slots, slot.pos)
            elif donor.pos >= n:
                self._take_cells(slot, donor, n)
                slot.waiting, slot.donor, slot.donor_request = False, None, None

    def _take_cells(self, slot: Slot, donor: Slot, n: int) -> None:
        """Replace a sequence that has decoded nothing of its own prompt yet with a copy of the donor's cells
        [0, n), which hold the same first n prompt tokens; it decodes only the rest."""
        self._ll.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        self._ll.llama_memory_seq_cp(self.mem, donor.seq, slot.seq, 0, n)
        self.last.shared_prompt_tokens += n - slot.pos
        slot.pending = slot.pending[n - slot.pos :]  # nothing of it was decoded while waiting
        slot.prompt_left = len(slot.tokens) - n
        slot.pos = n

    def _step(self, slots: list[Slot], queue: deque[int], prefix: int) -> int:
        """Put every running sequence's next tokens and as much pending prompt as fits in one batch; decode;
        sample. A decode that finds no room in the KV cache shrinks the batch and retries."""
        while True:
            self.batch.clear()
            outputs: list[tuple[Slot, int]] = []
            fed: list[tuple[Slot, int, int, bool]] = []  # slot, first pos fed, tokens fed, from the prompt
            room = self.n_batch
            for slot in slots:
                if slot.request is not None and slot.feed and len(slot.feed) <= room:
                    n = len(slot.feed)
                    for j, tok in enumerate(slot.feed):
                        idx = self.batch.add(tok, slot.pos + j, slot.seq, j == n - 1)
                    outputs.append((slot, idx))
                    fed.append((slot, slot.pos, n, False))
                    room -= n
            self._share(slots)
            for slot in slots:
                if slot.request is None or not slot.pending or slot.waiting or room <= 0:
                    continue
                chunk = slot.pending[:room]
                last_chunk = len(chunk) == len(slot.pending)
                for j, tok in enumerate(chunk):
                    idx = self.batch.add(tok, slot.pos + j, slot.seq, last_chunk and j == len(chunk) - 1)
                if last_chunk:
                    outputs.append((slot, idx))
                fed.append((slot, slot.pos, len(chunk), True))
                room -= len(chunk)
            if not fed:
                if any(s.request is not None and s.finish is None for s in slots):
                    raise GenerationError("internal error: running sequences but nothing to decode")
                produced, self._produced = self._produced, 0
                return produced
            ret = self.batch.decode(self.last)
            if ret == 0:
                break
            if ret == 1 and sum(1 for s in slots if s.request is not None) > 1:
                # No KV slot for this batch: roll back what it placed, hand the newest sequence back to the queue.
                for slot, pos, _, _ in fed:
                    self._ll.llama_memory_seq_rm(self.mem, slot.seq, pos, -1)
                victim = max((s for s in slots if s.request is not None), key=lambda s: s.started)
                queue.appendleft(victim.index)
                self._ll.llama_memory_seq_rm(self.mem, victim.seq, -1, -1)
                self._release(victim)
                slots.remove(victim)
                self.last.retries.append(f"decode found no KV room for {len(slots) + 1} sequences; retried with {len(slots)}")
                continue
            raise GenerationError(
                f"llama_decode failed (code {ret})" + (f": {last_error_line()}" if last_error_line() else "")
                + " (try a smaller --parallel or --ctx)"
            )
        for slot, pos, n, from_prompt in fed:
            slot.pos += n
            if from_prompt:
                slot.pending = slot.pending[n:]
                self.last.prompt_tokens += min(n, slot.prompt_left)  # the rest were forced output tokens
                slot.prompt_left = max(0, slot.prompt_left - n)
            else:
                slot.feed = []
        start = time.perf_counter()
        produced = 0
        rows = self.sampling.logit_rows(len(outputs), outputs[-1][1]) if outputs else None
        for j, (slot, idx) in enumerate(outputs):
            produced += self._advance(slot, self._sample(slot, idx, rows[j]))
        self.last.sample_seconds += time.perf_counter() - start
        self.last.completion_tokens += produced
        produced, self._produced = produced + self._produced, 0
        return produced

    def _advance(self, slot: Slot, tok: int) -> int:
        """Append a sampled token and then the grammar's forced tokens; returns how many were appended."""
        slot.n_out += 1
        if self._ll.llama_vocab_is_eog(self.vocab, tok):
            slot.finish = "eos"
            return 1
        slot.out += self.piece(tok)
        slot.feed = [tok]
        c = slot.constraint
        if c is None:
            return 1
        c.consume(tok)
        if c.stopped:  # the output is complete: nothing is left to decode
            slot.finish = "eos"
            return 1
        forced = self._force(slot)
        slot.feed += forced
        return 1 + len(forced)

    def _force(self, slot: Slot) -> list[int]:
        """Consume and append the tokens the grammar allows as the only continuation (jump-forward); they
        are decoded in the next batch without being sampled."""
        c = slot.constraint
        budget = min(slot.params.max_tokens - slot.n_out, FORCED_MAX, self.n_batch // 2)
        forced = c.forced()[:budget] if budget > 0 else []
        for t in forced:
            c.consume(t)
            slot.out += self.piece(t)
        slot.n_out += len(forced)
        self.last.forced_tokens += len(forced)
        if forced and c.stopped:
            slot.finish = "eos"
        elif slot.n_out >= slot.params.max_tokens:
            slot.finish = "length"  # no token left to sample: nothing more to decode either
        return forced

    def _finished(self, slot: Slot) -> tuple[str, str] | None:
        if slot.request is None or (slot.n_out == 0 and slot.finish is None):
            return None
        params = slot.params
        if params.stop:
            text = slot.out.decode("utf-8", errors="ignore")
            for stop in params.stop:
                at = text.find(stop)
                if at >= 0:
                    return text[:at], "stop"
        if slot.finish:
            return slot.out.decode("utf-8", errors="replace"), slot.finish
        if slot.n_out >= params.max_tokens:
            return slot.out.decode("utf-8", errors="replace"), "length"
        return None

    def close(self) -> None:
        ll = self._ll
        if self.batch is not None:
            self.batch.free()
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
