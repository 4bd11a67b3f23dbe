"""A sequence slot of the engine: the request it runs, its prompt and what it still has to decode, its
sampler and constraint, and what it waits for when it copies another sequence's cells; and the rule for
when copying cells beats decoding them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .grammar import Constraint
from .types import Request, SamplingParams


@dataclass
class Slot:
    seq: int
    request: Request | None = None
    index: int = -1  # the request's index in generate()'s list
    params: SamplingParams | None = None
    tokens: list[int] = field(default_factory=list)  # prompt
    ids: Any = None  # the prompt as a numpy array, to compare other prompts' first tokens with
    pending: list[int] = field(default_factory=list)  # prompt tokens still to decode (then tokens forced before sampling)
    prompt_left: int = 0  # how many of `pending` are the prompt's
    feed: list[int] = field(default_factory=list)  # sampled (and forced) tokens to decode next; logits for the last
    pos: int = 0
    n_out: int = 0
    out: bytearray = field(default_factory=bytearray)
    sampler: Any = None
    fast: bool = False  # drawn by Sampler.draw from numpy candidates, accepted once (else llama_sampler_sample)
    constraint: Constraint | None = None
    waiting: bool = False  # for `donor` to decode the first `share` tokens of this prompt, to copy its cells
    donor: Any = None  # the running sequence (a Slot) this one waits for, while it runs `donor_request`
    donor_request: Any = None
    share: int = 0
    started: float = 0.0
    finish: str | None = None  # "eos" when the model or the grammar ends the sequence


REUSE_MIN = 8  # prompt tokens worth copying from another sequence's cells instead of decoding them


def worth(n: int, start: int, last: int) -> bool:
    """Copy cells up to `n` rather than decode from `start`: REUSE_MIN tokens or more, or all of an identical
    prompt but its last token (k samples of one input)."""
    return n - start >= REUSE_MIN or (n == last and n > start)


def shared_start(a: Any, b: Any, limit: int) -> int:
    """How many first tokens the token arrays `a` and `b` share, at most `limit`."""
    import numpy as np

    n = min(limit, len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
