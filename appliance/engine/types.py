"""What the engine is asked and what it answers: sampling settings, a request, a completion, the run's
engine counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from .grammar import Grammar


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
    grammar: Grammar | str | None = None  # a Grammar, or GBNF text; else the engine's grammar
    params: SamplingParams | None = None  # this request's limits and sampling; else generate()'s params
    tokens: list[int] | None = None  # the prompt already tokenized (used as is; `prompt` is then only a label)
    add_bos: bool = True  # False for prompts that already start with the BOS text (chat-rendered)


@dataclass
class Completion:
    key: Any
    seed: int
    text: str
    tokens_in: int
    tokens_out: int  # sampled and forced (jump-forward) tokens, an end-of-generation token included
    finish_reason: str  # eos (the model's end token, or the grammar's output complete) | stop | length
    ms: int
    parallel: int  # sequences decoding together when this one finished


@dataclass
class EngineStats:
    """Counters of an engine's life (Engine.stats: added up when each generate() call ends) or of its
    latest generate() call (Engine.last, counted as it runs; no model loads)."""

    decode_calls: int = 0
    prompt_tokens: int = 0  # tokens decoded for prompts (the shared prefix counted once)
    completion_tokens: int = 0  # sampled + forced
    shared_prefix_tokens: int = 0  # the common prefix of all prompts, decoded once
    shared_prompt_tokens: int = 0  # prompt tokens not decoded: copied from an identical prompt's sequence
    forced_tokens: int = 0  # appended without sampling because the grammar allowed nothing else
    grammar_resamples: int = 0  # sampled tokens the grammar rejected (masked and sampled again)
    decode_seconds: float = 0.0
    sample_seconds: float = 0.0  # sampling, grammar checks, masks and forced tokens
    grammar_init_seconds: float = 0.0  # building the grammar tokenizer (once per engine)
    model_loads: int = 0
    load_seconds: float = 0.0
    retries: list[str] = field(default_factory=list)  # decode failures that shrank the batch

    def add(self, other: EngineStats) -> None:
        """Add another call's counters (model loads are the engine's, not added)."""
        for f in fields(self):
            if f.name in ("model_loads", "load_seconds"):
                continue
            if f.name == "shared_prefix_tokens":
                self.shared_prefix_tokens = other.shared_prefix_tokens
            elif f.name == "retries":
                self.retries.extend(other.retries)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def greedy_twins(requests: Sequence[Request], default: SamplingParams) -> tuple[list[int], dict[int, list[int]]]:
    """Requests that must come out identical: greedy (temperature 0) with the same prompt, settings and grammar.
    Decoded side by side they would not always be (each sits in a different batch, and llama.cpp's sums
    differ with the batch), so only the first of each group is decoded and its completion is given to the
    others. Returns the indices to decode, and for each of them the indices of its twins."""
    leaders: list[int] = []
    twins: dict[int, list[int]] = {}
    first: dict[Any, int] = {}
    for i, r in enumerate(requests):
        p = r.params or default
        if p.temperature > 0:
            leaders.append(i)
            continue
        grammar = r.grammar if r.grammar is None or isinstance(r.grammar, str) else id(r.grammar)
        key = (tuple(r.tokens) if r.tokens is not None else r.prompt, r.add_bos, p.model_dump_json(), grammar)
        if key in first:
            twins[first[key]].append(i)
        else:
            first[key] = i
            leaders.append(i)
            twins[i] = []
    return leaders, {i: js for i, js in twins.items() if js}
