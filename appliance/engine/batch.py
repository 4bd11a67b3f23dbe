"""The one llama_batch an engine reuses for every decode call: tokens added with their position, their
sequence and whether their logits are wanted; each decode timed into the caller's counters."""

from __future__ import annotations

import time
from typing import Any

from ..errors import GenerationError
from .llama import raise_pending_interrupt
from .types import EngineStats


class Batch:
    def __init__(self, ll: Any, ctx: Any, n_batch: int) -> None:
        self._ll, self.ctx, self.n_batch = ll, ctx, n_batch
        self.raw = ll.llama_batch_init(n_batch, 0, 1)

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Add one token; its index in the batch (the row of its logits when `logits`)."""
        b, i = self.raw, self.raw.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def decode(self, stats: EngineStats) -> int:
        """llama_decode's return code (0: done; 1: no KV room for the batch)."""
        start = time.perf_counter()
        ret = self._ll.llama_decode(self.ctx, self.raw)
        stats.decode_seconds += time.perf_counter() - start
        stats.decode_calls += 1
        raise_pending_interrupt()
        return ret

    def decode_or_raise(self, stats: EngineStats) -> None:
        ret = self.decode(stats)
        if ret != 0:
            raise GenerationError(f"llama_decode failed on the shared prompt prefix (code {ret}); try a smaller --ctx")

    def free(self) -> None:
        if self.raw is not None:
            self._ll.llama_batch_free(self.raw)
            self.raw = None
