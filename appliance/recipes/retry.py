"""Empty outputs are generated again with new seeds, a small number of times, and recorded as retries.

A base model sometimes ends an output before its first real token (its first token is end-of-text, or
a stop string such as a blank line). Such an item is generated again under a new seed rather than
dropped. Attempt a of item i is item index a * ITEM_LIMIT + i (the layout is in
`appliance.runs.items`); its seed is derived from its own index.

Which retries exist follows from what is stored, so a resumed run makes exactly the missing ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engine.types import SamplingParams
from ..data.filters import cue_line, strip_cue
from ..runs.items import ITEM_LIMIT, RETRY_BUDGET, Execution, Item, item_seeds, pending

if TYPE_CHECKING:
    from ..runs.session import RunSession


def attempt_of(index: int) -> tuple[int, int]:
    """(the recipe item, the attempt) of a generation's item index."""
    return index % ITEM_LIMIT, index // ITEM_LIMIT


def retry_index(item: int, attempt: int) -> int:
    return attempt * ITEM_LIMIT + item


def cleaned(output: str, rendered_prompt: str) -> tuple[str, str | None, int]:
    """The output without surrounding whitespace and leading echoes of the prompt's cue line; the cue and
    how many echoes were removed."""
    cue = cue_line(rendered_prompt)
    text, n = strip_cue(output.strip(), cue)
    return text.strip(), cue, n


def is_empty(gen: dict[str, Any]) -> bool:
    return not cleaned(gen["output"], gen["rendered_prompt"])[0]


def attempts(gens: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The final attempt of each recipe item (in item order), and the ids of the superseded attempts with
    the item index of the attempt that replaced each."""
    by_item: dict[int, list[dict[str, Any]]] = {}
    for g in gens:
        if g["item_index"] < (RETRY_BUDGET + 1) * ITEM_LIMIT:
            by_item.setdefault(attempt_of(g["item_index"])[0], []).append(g)
    finals, superseded = [], {}
    for item in sorted(by_item):
        tries = sorted(by_item[item], key=lambda g: g["item_index"])
        finals.append(tries[-1])
        for old, new in zip(tries, tries[1:]):
            superseded[old["id"]] = new["item_index"]
    return finals, superseded


def retry_items(gens: list[dict[str, Any]], items: list[Item], base_seed: int, attempt: int) -> list[Item]:
    """Attempt `attempt` of every item whose attempt `attempt - 1` is stored and came out empty."""
    previous = {g["item_index"]: g for g in gens}
    out = []
    for it in items:
        g = previous.get(retry_index(it.index, attempt - 1))
        if g is None or not is_empty(g):
            continue
        index = retry_index(it.index, attempt)
        out.append(Item(index=index, seed=item_seeds(base_seed, 1, start=index)[0], prompt=it.prompt,
                        variables=it.variables, chunk_id=it.chunk_id, grammar=it.grammar, params=it.params,
                        messages=it.messages, add_bos=it.add_bos))  # prompted exactly as the attempt it replaces
    return out


def run_retries(
    session: RunSession, prompt_id: int | None, items: list[Item], params: SamplingParams, base_seed: int, *,
    grammar: Any = None,
) -> list[Execution]:
    """Generate again, with new seeds, the items that came out empty, up to RETRY_BUDGET times each;
    each round is recorded as a run event. Runs on the session's loaded model."""
    store, run_id = session.store, session.run_id
    executions = []
    for attempt in range(1, RETRY_BUDGET + 1):
        gens = store.rows("SELECT id, item_index, output, rendered_prompt FROM generations WHERE run_id = ? AND item_index < ?",
                          [run_id, (RETRY_BUDGET + 1) * ITEM_LIMIT])
        retries = retry_items(gens, items, base_seed, attempt)
        todo = pending(store, run_id, retries)
        if not todo:
            continue
        session.event("info", f"retry {attempt} of {RETRY_BUDGET}: {len(todo)} empty "
                              f"output{'s' if len(todo) > 1 else ''} generated again with new seeds "
                              f"(items {', '.join(str(attempt_of(it.index)[0]) for it in todo[:10])}"
                              f"{', ...' if len(todo) > 10 else ''})")
        executions.append(session.generate(todo, params, prompt_id=prompt_id, grammar=grammar))
    return executions
