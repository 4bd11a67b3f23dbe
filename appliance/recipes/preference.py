"""Preference pairs: k responses to each instruction, each scored by the rubric judge; chosen = the best, rejected
= the worst.

A `preference` recipe makes its instructions like a synthetic one (its prompt over the axes, `count` of
them). Response r of instruction i is item r * ITEM_LIMIT + i (`appliance.runs.items`), with its own seed
and temperature: `temperatures` cycled over r, or by default a spread from half to one and a half times
the run's temperature (response 0 the coolest). Responses go through the mechanical filters (empty, cut
off, length, schema); those that pass are scored by the judge (`appliance.runs.rubric`). Per instruction:

- fewer than two responses scored: dropped by `responses`;
- the best mean score below the judge's threshold: dropped by `all_bad` (no good answer to prefer);
- best - worst below `min_margin`: dropped by `tie` (nothing to learn from the difference);
- else kept by `preference`: the example's output is the best response, `rejected` the worst.

The exported user message is the recipe's `instruction` template over the axes, else the rendered user
prompt. There are no retries of empty responses (their indices are the responses'): an empty response is
simply not scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.filters import (
    Verdict,
    check_json,
    check_length,
    check_not_empty,
    check_truncated,
    cue_verdict,
)
from ..engine.types import SamplingParams
from ..runs.items import ITEM_LIMIT, JUDGE_BASE, Execution, Item, item_seeds, merge
from ..runs.rubric import Judged, Rubric, judge_verdicts, run_judge
from ..store import Store
from .judge import INSTRUCTION_ENV, Candidate, store_judgement, system_message
from .recipe import Recipe
from .retry import cleaned

if TYPE_CHECKING:
    from ..runs.session import RunSession

COLUMNS = "id, item_index, output, rendered_prompt, variables_json, finish_reason, messages_json"


def temperatures(recipe: Recipe, base: float) -> list[float]:
    """Each response's temperature: `temperatures` cycled over the responses, else from 0.5x to 1.5x the
    run's temperature (0.7 when the run is greedy)."""
    k = recipe.n_responses
    if recipe.temperatures:
        return [recipe.temperatures[r % len(recipe.temperatures)] for r in range(k)]
    t = base or 0.7
    return [round(t * (0.5 + r / (k - 1)), 3) for r in range(k)]


def response_items(recipe: Recipe, items: list[Item], params: SamplingParams) -> list[Item]:
    """k items per instruction, response-major (every instruction's response 0 first): response 0 keeps the
    instruction's seed, the others get their own."""
    out = []
    for r, t in enumerate(temperatures(recipe, params.temperature)):
        p = params.model_copy(update={"temperature": t})
        for it in items:
            index = r * ITEM_LIMIT + it.index
            seed = it.seed if r == 0 else item_seeds(recipe.seed, 1, start=index)[0]
            out.append(Item(index=index, seed=seed, prompt=it.prompt, variables=it.variables, grammar=it.grammar, params=p,
                            messages=it.messages, add_bos=it.add_bos))
    return out


@dataclass
class Response:
    number: int  # r
    index: int  # its generation's item index
    candidate: Candidate  # its text and mechanical verdicts (no example of its own)


def responses_of(recipe: Recipe, gens: list[dict[str, Any]], schema: dict | None) -> dict[int, list[Response]]:
    """instruction -> its stored responses (in response order), each with the mechanical filters' verdicts."""
    template = INSTRUCTION_ENV.from_string(recipe.instruction) if recipe.instruction else None
    out: dict[int, list[Response]] = {}
    for g in sorted(gens, key=lambda g: g["item_index"]):
        if g["item_index"] >= JUDGE_BASE:
            continue
        item, r = g["item_index"] % ITEM_LIMIT, g["item_index"] // ITEM_LIMIT
        messages = json.loads(g["messages_json"]) if g["messages_json"] else None
        if template is not None:
            instruction = template.render(**json.loads(g["variables_json"] or "{}"))
        elif messages:
            instruction = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        else:
            instruction = g["rendered_prompt"].strip()
        text, cue, n_cue = cleaned(g["output"], g["rendered_prompt"])
        cand = Candidate(g["id"], item, instruction, "", text, None, replaced=True,
                         system=recipe.system if recipe.system is not None else system_message(g["messages_json"]))
        if n_cue:
            cand.verdicts.append(cue_verdict(cue or "", n_cue))
        cand.verdicts += [check_not_empty(text), check_truncated(g["finish_reason"], allow_truncated=recipe.filters.allow_truncated)]
        if recipe.filters.min_words is not None or recipe.filters.max_words is not None:
            cand.verdicts.append(check_length(text, min_words=recipe.filters.min_words, max_words=recipe.filters.max_words))
        if schema is not None:
            cand.verdicts.append(check_json(text, schema))
        out.setdefault(item, []).append(Response(r, g["item_index"], cand))
    return out


def pair(recipe: Recipe, responses: list[Response], scores: dict[int, Verdict], cutoff: float) -> Candidate:
    """The instruction's example: chosen (best mean), rejected (worst), and the verdict that keeps or drops it.
    The judge's verdicts are added to each response."""
    scored = []
    for resp in responses:
        c = resp.candidate
        v = scores.get(c.generation_id)
        if c.kept and v is not None and v.score is not None:
            scored.append((v.score, resp))
        if v is not None:
            c.verdicts.append(v)
    first = responses[0].candidate
    if len(scored) < 2:
        best = max(scored, key=lambda s: s[0])[1].candidate if scored else first
        found = Verdict(filter="responses", passed=False,
                        reason=f"{len(scored)} of {len(responses)} responses passed the filters and were scored; a pair needs 2")
        return Candidate(best.generation_id, best.item_index, best.instruction, "", best.output, None, [found], system=best.system)
    top, bottom = max(scored, key=lambda s: (s[0], -s[1].number)), min(scored, key=lambda s: (s[0], -s[1].number))
    margin = top[0] - bottom[0]
    if top[0] < cutoff:
        found = Verdict(filter="all_bad", passed=False, score=top[0],
                        reason=f"the best of {len(scored)} responses (response {top[1].number}) scored {top[0]:.2f}, below the threshold {cutoff:g}")
    elif margin < recipe.margin:
        found = Verdict(filter="tie", passed=False, score=margin,
                        reason=f"{len(scored)} responses scored {bottom[0]:.2f}-{top[0]:.2f}: margin {margin:.2f} below min_margin {recipe.margin:g}")
    else:
        found = Verdict(filter="preference", passed=True, score=margin,
                        reason=f"response {top[1].number} ({top[0]:.2f}) chosen over response {bottom[1].number} ({bottom[0]:.2f}): "
                               f"margin {margin:.2f}")
    chosen, rejected = top[1].candidate, bottom[1].candidate
    return Candidate(chosen.generation_id, chosen.item_index, chosen.instruction, "", chosen.output, None, [found],
                     system=chosen.system, rejected=rejected.output, rejected_generation_id=rejected.generation_id)


def run_pairs(session: RunSession, recipe: Recipe, rubric: Rubric, responses: list[Item], params: SamplingParams, *,
              prompt_id: int | None, grammar: Any, schema: dict | None) -> Execution | None:
    """Generate the responses the run lacks (`responses`: `response_items` of the run's items), score those the
    judge has not, then store the pairs (the run's verdicts and examples replaced in one transaction)."""
    store, run_id = session.store, session.run_id
    made = session.generate(responses, params, prompt_id=prompt_id, grammar=grammar)
    sets = responses_of(recipe, _rows(store, run_id, below=JUDGE_BASE), schema)
    judged = [Judged(r.candidate.generation_id, r.index, r.candidate.instruction, r.candidate.output)
              for item in sorted(sets) for r in sets[item] if r.candidate.kept]
    scored = run_judge(session, rubric, judged, recipe.seed)
    scores = judge_verdicts(rubric.config, _rows(store, run_id, below=None))
    candidates = []
    for item in sorted(sets):
        candidates.append(pair(recipe, sets[item], scores, rubric.config.cutoff))  # first: its verdict is the drop's reason
        candidates += [r.candidate for r in sets[item]]
    store_judgement(store, run_id, recipe, candidates)
    return merge([made, scored])


def _rows(store: Store, run_id: int | None, *, below: int | None) -> list[dict[str, Any]]:
    if below is None:
        return store.rows(f"SELECT {COLUMNS} FROM generations WHERE run_id = ? AND item_index >= ?", [run_id, JUDGE_BASE])
    return store.rows(f"SELECT {COLUMNS} FROM generations WHERE run_id = ? AND item_index < ?", [run_id, below])
