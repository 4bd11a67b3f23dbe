"""The fidelity filter: does an output match the axis values it was asked for?

A synthetic recipe names axes to check (`[filters] fidelity = ["tone"]`). After generation, the model
re-labels each final output under a grammar over that axis's values (its own small prompt, greedy), as
a second phase of the run at item indices from FIDELITY_BASE. An output whose label differs from the
value it was written for fails the `fidelity` verdict, which names the predicted value; the run
summary and the dataset card show the share that matched, per axis.

A check prompt is a prompt file whose template uses `text` (the output, on one line) and may use
`axis` and `values` (the axis's values); without `fidelity_prompt` the built-in one below is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.types import SamplingParams
from ..errors import ApplianceError
from ..prompts.files import PromptFile, load_prompt, parse_prompt
from ..data.filters import Verdict
from .recipe import LoadedRecipe
from ..runs.items import FIDELITY_BASE, ITEM_LIMIT, Execution, Item, item_seeds, merge, pending
from ..runs.summary import fidelity_checks
from ..store import Store

if TYPE_CHECKING:
    from ..runs.session import RunSession

CHECK_VARIABLES = ("text", "axis", "values")
MAX_TOKENS = 16

DEFAULT_PROMPT = """+++
name = "fidelity-check"
description = "Re-labels an output with the axis value it reads as (the fidelity filter's default prompt)."
+++
Each text below is labelled with its {{ axis }}: one of {{ values | join(", ") }}.

Text: {{ text }}
{{ axis | capitalize }}:
"""


class FidelityError(ApplianceError):
    """A fidelity check that cannot be made as the recipe asks."""


@dataclass
class Check:
    axis: str
    values: list[str]
    prompt: PromptFile


def load_checks(loaded: LoadedRecipe) -> list[Check]:
    """The recipe's fidelity checks, validated before anything is generated."""
    recipe = loaded.recipe
    axes = recipe.filters.fidelity
    if not axes:
        return []
    if recipe.kind != "synthetic":
        raise FidelityError(f"recipe {loaded.path}: filters.fidelity checks axes, which only synthetic recipes have")
    unknown = [a for a in axes if a not in recipe.axes]
    if unknown:
        raise FidelityError(f"recipe {loaded.path}: filters.fidelity names {', '.join(repr(a) for a in unknown)}, "
                            f"not an axis (axes: {', '.join(recipe.axes) or 'none'})")
    if recipe.filters.fidelity_prompt:
        prompt = load_prompt(loaded.resolve(recipe.filters.fidelity_prompt))
    else:
        prompt = parse_prompt(DEFAULT_PROMPT, name="fidelity-check")
    where = prompt.path or prompt.name
    if "text" not in prompt.variables:
        raise FidelityError(f"fidelity prompt {where} must use {{{{ text }}}} (the output to label)")
    other = [v for v in prompt.variables if v not in CHECK_VARIABLES]
    if other:
        raise FidelityError(f"fidelity prompt {where} uses {', '.join(repr(v) for v in other)}, which a check does not "
                            f"give (it gives: {', '.join(CHECK_VARIABLES)})")
    return [Check(axis, [str(v) for v in recipe.axes[axis]], prompt) for axis in axes]


def grammar(values: list[str]) -> str:
    """GBNF for one of the values, after an optional space (the prompt ends with its cue, "Tone:")."""
    literals = " | ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return f'root ::= " "? ({literals})\n'


def params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=["\n"])


def check_items(checks: list[Check], finals: list[tuple[int, int, str, dict[str, Any]]], base_seed: int) -> list[Item]:
    """One item per check and final output: (recipe item, generation id, cleaned text, its variables)."""
    items = []
    for k, check in enumerate(checks):
        for item, generation_id, text, variables in finals:
            index = FIDELITY_BASE + k * ITEM_LIMIT + item
            prompt = check.prompt.render({"text": " ".join(text.split()), "axis": check.axis, "values": check.values})
            items.append(Item(index=index, seed=item_seeds(base_seed, 1, start=index)[0], prompt=prompt,
                              grammar=grammar(check.values),
                              variables={"check": "fidelity", "axis": check.axis, "expected": str(variables.get(check.axis)),
                                         "of_item": item, "generation_id": generation_id}))
    return items


def run_checks(
    session: RunSession, checks: list[Check], finals: list[tuple[int, int, str, dict[str, Any]]], base_seed: int,
) -> Execution | None:
    """Label every final output under each check's grammar (the items the run has not stored yet), on the
    session's loaded model."""
    store = session.store
    items = check_items(checks, finals, base_seed)
    todo = pending(store, session.run_id, items)
    if not todo:
        return None
    prompt_ids = {c.prompt.sha256: store.save_prompt(c.prompt.name, c.prompt.text, c.prompt.sha256, c.prompt.path) for c in checks}
    executions = []
    for check in checks:  # one stage per prompt file, so each generation names its prompt
        mine = [it for it in todo if it.variables["axis"] == check.axis]
        if mine:
            executions.append(session.generate(mine, params(), prompt_id=prompt_ids[check.prompt.sha256]))
    return merge(executions)


def verdict(found: dict[str, tuple[str, str | None]]) -> Verdict:
    """Pass when every checked axis was labelled with the value asked for; the reason names each label."""
    parts, matched = [], 0
    for axis, (asked, predicted) in sorted(found.items()):
        if predicted == asked:
            matched += 1
            parts.append(f"{axis}: labelled {predicted!r} as asked")
        else:
            parts.append(f"{axis}: asked {asked!r}, labelled {predicted!r}" if predicted else f"{axis}: asked {asked!r}, no label")
    return Verdict(filter="fidelity", passed=matched == len(found), score=matched / len(found), reason="; ".join(parts))


def uninformative(store: Store, run_id: int) -> list[str]:
    """Warnings for checks that gave (nearly) every output the same label whatever was asked: such a check
    prompt does not tell the values apart (a base model answering a zero-shot prompt does this), and
    its drops say nothing about the outputs."""
    by_axis: dict[str, list[tuple[str, str | None]]] = {}
    for found in fidelity_checks(store, run_id).values():
        for axis, pair in found.items():
            by_axis.setdefault(axis, []).append(pair)
    out = []
    for axis, pairs in sorted(by_axis.items()):
        predicted = [p for _, p in pairs]
        top = max(set(predicted), key=lambda v: (predicted.count(v), str(v)))
        if len(pairs) >= 5 and len({a for a, _ in pairs}) > 1 and predicted.count(top) >= 0.9 * len(pairs):
            out.append(f"fidelity {axis}: {predicted.count(top)} of {len(pairs)} outputs labelled {top!r} whatever was asked; "
                       "the check prompt does not tell the values apart (give the recipe a few-shot filters.fidelity_prompt)")
    return out
