"""Sampling a step's logits: each sequence's sampler chain, and a fast path that reads the logits as one
numpy matrix (greedy is a row's argmax; a chain that starts with top-k is given only the row's top
candidates, since llama_sampler_sample would copy all n_vocab logits per sequence per step). The same
seed draws the same tokens either way."""

from __future__ import annotations

import ctypes
from typing import Any

from ..errors import GenerationError
from .grammar import GrammarError
from .types import SamplingParams


def token_data_array(n: int) -> Any:
    """A numpy array laid out as llama.cpp's llama_token_data (id int32, logit float, p float)."""
    import numpy as np

    return np.zeros(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))


def top_candidates(row: Any, k: int) -> Any:
    """Indices of a set of logits that holds the row's k largest (ties at the k-th may add a few): those
    within a margin of the maximum (cheap), widened, and an exact partition as the last resort."""
    import numpy as np

    top = row.max()
    for margin in (8.0, 16.0, 32.0):
        cand = np.flatnonzero(row >= top - margin)
        if len(cand) >= k:
            return cand
    return np.argpartition(row, -k)[-k:] if k < len(row) else np.arange(len(row))


class Sampler:
    """The engine's sampling machinery over one context: chains, the logits matrix, and the draw."""

    def __init__(self, ll: Any, ctx: Any, vocab: Any, n_vocab: int) -> None:
        self._ll, self.ctx, self.vocab, self.n_vocab = ll, ctx, vocab, n_vocab
        self._cand_buf = token_data_array(256)
        self._full_buf: Any = None
        self._all_ids: Any = None
        self._cand_arr = ll.llama_token_data_array()
        self._token_data_p = ctypes.POINTER(ll.llama_token_data)

    def chain(self, params: SamplingParams, seed: int, gbnf: str | None) -> Any:
        """The sequence's chain. Only a GBNF grammar llguidance could not take goes into it (llama.cpp's
        grammar sampler, applied to every candidate); llguidance grammars are checked after sampling."""
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if gbnf:
            g = ll.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
            if not g:
                ll.llama_sampler_free(chain)
                raise GrammarError("llama.cpp rejected the output grammar (see `APPLIANCE_DEBUG=1` for its log)")
            ll.llama_sampler_chain_add(chain, g)
        if params.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(self.n_vocab, 64, params.repeat_penalty, 0.0, 0.0))
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


    def logit_rows(self, n_rows: int, last_index: int) -> Any:
        """The decode's logits as a (n_rows, n_vocab) numpy view: llama.cpp stores the requested rows
        contiguously in batch order; `last_index` is the batch index of the last row."""
        import numpy as np

        ll = self._ll
        rows = np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(n_rows, self.n_vocab))
        last = ctypes.cast(ll.llama_get_logits_ith(self.ctx, last_index), ctypes.c_void_p).value
        if last != rows.ctypes.data + (n_rows - 1) * self.n_vocab * 4:
            raise GenerationError("internal error: llama.cpp's logits rows are not in batch order")
        return rows


    def draw(self, chain: Any, fast: bool, p: SamplingParams, idx: int, row: Any) -> int:
        """One token from the chain, not yet accepted (a grammar may reject it). llama_sampler_sample
        copies all n_vocab logits into a fresh candidate array (~1 ms for 262k, mostly page faults) and
        accepts what it draws; a chain that starts with top-k sees the same candidates when given only
        the row's top entries (found with numpy in ~0.1 ms), and greedy is the row's argmax."""
        if not fast:
            return self._ll.llama_sampler_sample(chain, self.ctx, idx)  # accepts the token itself
        if p.repeat_penalty == 1.0 and p.temperature <= 0:
            return int(row.argmax())
        if p.repeat_penalty == 1.0 and p.top_k > 0:
            cand = top_candidates(row, p.top_k)
            data = self._cand_buf
            if len(data) < len(cand):
                data = self._cand_buf = token_data_array(len(cand))
            data = data[: len(cand)]
            data["id"] = cand
            data["logit"] = row[cand]
        else:  # penalties change logits before top-k, or no top-k: the whole vocabulary, as llama.cpp does
            import numpy as np

            if self._full_buf is None:
                self._full_buf = token_data_array(self.n_vocab)
                self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
            data = self._full_buf
            data["id"] = self._all_ids  # again each time: the samplers sort the array in place
            data["logit"] = row
        data["p"] = 0.0
        arr = self._cand_arr
        arr.data = ctypes.cast(data.ctypes.data, self._token_data_p)
        arr.size, arr.selected, arr.sorted = len(data), -1, False
        self._ll.llama_sampler_apply(chain, ctypes.byref(arr))
        if not 0 <= arr.selected < len(data):
            raise GenerationError("internal error: the sampler chain selected no token")
        return int(data["id"][arr.selected])
