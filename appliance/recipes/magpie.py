"""Magpie (Xu et al. 2024, "Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing"):
an instruct model given only its chat template's pre-query text (everything up to where a user message's
content starts) writes a user's request itself; it then answers that request as a normal chat turn.

A synthetic recipe with `magpie = true` runs in two stages on one loaded model:

1. requests: item i's prompt is the raw pre-query text (`PromptStyle.pre_query`), with the recipe's
   `system` (a Jinja2 template over the axes and vars) as the system message, so the axes steer what the
   requests are about; every item shares that prefix, which the engine decodes once. The template's own
   end-of-turn token (an end-of-generation token of the model: ChatML's `<|im_end|>`) ends the request;
   markers the model spells out as text, or an assistant header it starts, are cut off. An empty request
   is generated again under a new seed like any synthetic output (`appliance.recipes.retry`); a request
   that opens the assistant's turn, is cut off at max_tokens or is shorter than REQUEST_MIN_WORDS words
   is dropped with a `request` verdict that says which.
2. answers: each kept request, as [system?, user: request] through the chat template, at item index
   ANSWER_BASE + i (`appliance.runs.items`), all in one engine call.

Example: instruction = the request, output = the answer, system = the rendered system prompt (or none),
through the usual filters (not_empty, truncated, length on the answer; near-duplicates over request and
answer). Each stage stores its rows as they complete, so a killed run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jinja2
import jinja2.meta

from ..data.filters import (
    NearDuplicateIndex,
    Verdict,
    check_length,
    check_not_empty,
    check_truncated,
)
from ..engine.types import SamplingParams
from ..errors import ApplianceError, ChatTemplateError
from ..events import RunEvents
from ..models.registry import ModelRecord, Registry
from ..prompts.chat import BUILTIN_TEMPLATES
from ..runs.items import (
    ANSWER_BASE,
    FIDELITY_BASE,
    ITEM_LIMIT,
    JUDGE_BASE,
    Item,
    item_seeds,
    merge,
    pending,
)
from ..runs.queries import find_resumable
from ..runs.rubric import judge_workload, load_rubric
from ..runs.session import RunSession
from ..runs.style import PreQuery, PromptStyle, style_for
from ..runs.summary import RunSummary, summarize
from ..store import Store
from .build import axis_combinations
from .judge import INSTRUCTION_ENV, Candidate, score_candidates, store_judgement, system_message
from .recipe import LoadedRecipe, RecipeError
from .retry import attempt_of, attempts, run_retries

REQUEST_MIN_WORDS = 3  # a request shorter than this ("Hi", "Thanks!") asks for nothing to learn from
PROMPT_NAME = "magpie-pre-query"


class Magpie:
    """A magpie recipe's pre-query texts (one per distinct system prompt) on one model's chat style."""

    def __init__(self, loaded: LoadedRecipe, style: PromptStyle, system_template: jinja2.Template | None) -> None:
        self.loaded, self.recipe, self.style = loaded, loaded.recipe, style
        self.system_template = system_template
        self._pre: dict[str | None, PreQuery] = {}

    def pre_query(self, system: str | None) -> PreQuery:
        if system not in self._pre:  # each render is a round trip to the sandboxed template worker
            self._pre[system] = self.style.pre_query(system)
        return self._pre[system]

    def system(self, values: dict[str, Any]) -> str | None:
        return self.system_template.render(**self.recipe.vars, **values) if self.system_template else None

    def request_items(self) -> list[Item]:
        """Stage 1: one item per axis assignment, its prompt the pre-query text under its own system prompt."""
        recipe = self.recipe
        assignments = axis_combinations(recipe.axes, recipe.count or 0, recipe.seed)
        items = []
        for index, (values, seed) in enumerate(zip(assignments, item_seeds(recipe.seed, len(assignments)))):
            system = self.system(values)
            pq = self.pre_query(system)
            items.append(Item(index=index, seed=seed, prompt=pq.text, variables=values, add_bos=pq.add_bos,
                              messages=[{"role": "system", "content": system}] if system is not None else []))
        return items

    def request_params(self, params: SamplingParams) -> SamplingParams:
        """The recipe's sampling, also stopping at the template's markers should the model write them as text."""
        return params.model_copy(update={"stop": [*params.stop, *self.pre_query(None).markers]})

    def prompt_row(self) -> tuple[str, str]:
        """(text, sha256) of the prompt stored for the run: the pre-query text with the system template unrendered."""
        text = self.style.pre_query(self.recipe.system).text
        return text, hashlib.sha256(text.encode()).hexdigest()

    def request(self, gen: dict[str, Any]) -> tuple[str, Verdict]:
        """A stored stage-1 generation's request (markers cut off) and the `request` verdict on it."""
        pq = self.pre_query(None)
        output = gen["output"] or ""
        request = pq.request(output)
        words = len(request.split())
        if pq.opens_answer(output):
            problem = "the model opened the assistant's turn instead of writing a request"
        elif not request:
            problem = "the request is empty"
        elif gen["finish_reason"] == "length" and request == output.strip():
            problem = "the request was cut off at max_tokens"
        elif words < REQUEST_MIN_WORDS:
            problem = f"the request has {words} word{'s' if words != 1 else ''}, fewer than {REQUEST_MIN_WORDS}"
        else:
            return request, Verdict(filter="request", passed=True, score=words, reason=f"a request of {words} words")
        return request, Verdict(filter="request", passed=False, score=words, reason=problem)

    def answer_items(self, store: Store, run_id: int) -> list[Item]:
        """Stage 2: the answer to each final request that passed, as a normal chat turn."""
        items = []
        for g in attempts(_request_gens(store, run_id))[0]:
            request, verdict = self.request(g)
            if not verdict.passed:
                continue
            item = attempt_of(g["item_index"])[0]
            system = system_message(g["messages_json"])
            index = ANSWER_BASE + item
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": request}]
            values = {**_variables(g), "of_item": item, "request_generation_id": g["id"]}
            items.append(self.style.message_item(messages, index=index, seed=item_seeds(self.recipe.seed, 1, start=index)[0],
                                                 variables=values))
        return items

    def judge(self, store: Store, run_id: int) -> list[Candidate]:
        """Every item's verdicts: the request's, then the answer's filters (an item whose request was dropped
        has no answer and makes a dropped example of the request alone)."""
        f = self.recipe.filters
        dedup = NearDuplicateIndex(threshold=f.near_duplicate_threshold) if f.near_duplicate_threshold else None
        answers = {g["item_index"] - ANSWER_BASE: g for g in store.rows(
            "SELECT id, item_index, output, finish_reason FROM generations WHERE run_id = ? AND item_index >= ? AND item_index < ?",
            [run_id, ANSWER_BASE, JUDGE_BASE])}
        finals, superseded = attempts(_request_gens(store, run_id))
        out = []
        for g in _request_gens(store, run_id):
            if g["id"] in superseded:
                cand = Candidate(g["id"], attempt_of(g["item_index"])[0], "", "", "", None, replaced=True)
                cand.verdicts.append(Verdict(filter="not_empty", passed=False, reason="request is empty; generated again "
                                             f"with a new seed as item {superseded[g['id']]}"))
                out.append(cand)
        for g in finals:
            item = attempt_of(g["item_index"])[0]
            request, verdict = self.request(g)
            answer = answers.get(item)
            system = system_message(g["messages_json"])
            if not verdict.passed or answer is None:
                if verdict.passed:  # the run was stopped before this answer: it is made when the run continues
                    verdict = Verdict(filter="request", passed=False, reason="not answered yet (continue the run)")
                out.append(Candidate(g["id"], item, request, "", "", None, [verdict], system=system))
                continue
            text = (answer["output"] or "").strip()
            cand = Candidate(answer["id"], item, request, "", text, None, [verdict], system=system)
            cand.verdicts += [check_not_empty(text), check_truncated(answer["finish_reason"], allow_truncated=f.allow_truncated)]
            if f.min_words is not None or f.max_words is not None:
                cand.verdicts.append(check_length(text, min_words=f.min_words, max_words=f.max_words))
            if dedup is not None and cand.kept:
                cand.verdicts.append(dedup.check(str(item + 1), f"{request}\n{text}"))
            out.append(cand)
        return out


def _request_gens(store: Store, run_id: int) -> list[dict[str, Any]]:
    return store.rows("SELECT id, item_index, output, finish_reason, messages_json, variables_json FROM generations "
                      "WHERE run_id = ? AND item_index < ? ORDER BY item_index", [run_id, FIDELITY_BASE])


def _variables(gen: dict[str, Any]) -> dict[str, Any]:
    return json.loads(gen["variables_json"] or "{}")


def _system_template(loaded: LoadedRecipe) -> jinja2.Template | None:
    """The recipe's `system` as a template over its axes and vars; refused when it names a variable the
    recipe does not give, or when an axis would steer nothing (only `system` reaches a magpie model)."""
    recipe = loaded.recipe
    source = recipe.system
    used: set[str] = set()
    if source is not None:
        try:
            used = jinja2.meta.find_undeclared_variables(INSTRUCTION_ENV.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise RecipeError(f"recipe {loaded.path}: key 'system': not a valid Jinja2 template: {exc.message}") from None
    missing = sorted(used - set(recipe.axes) - set(recipe.vars))
    if missing:
        raise RecipeError(f"recipe {loaded.path}: key 'system': uses {', '.join(repr(m) for m in missing)}, which the recipe "
                          "does not give (add to [axes] or [vars])")
    unused = sorted(set(recipe.axes) - used)
    if unused:
        raise RecipeError(f"recipe {loaded.path}: axis {', '.join(repr(a) for a in unused)} is not used by `system`, the only "
                          "text a magpie recipe gives the model (use it there, e.g. {{ " + unused[0] + " }}, or remove it)")
    return INSTRUCTION_ENV.from_string(source) if source is not None else None


def magpie_style(record: ModelRecord, loaded: LoadedRecipe, mode: str | None, chat_template: str | None) -> PromptStyle:
    """The model's chat style; refused, in one line, for completion mode and for a model without a chat template."""
    recipe = loaded.recipe
    if (mode or recipe.mode) == "completion":
        raise ApplianceError(f"recipe {loaded.path} is a magpie recipe: it needs chat mode (the model continues its chat "
                             "template's pre-query text), not --mode completion")
    template = chat_template or recipe.chat_template
    style = style_for(record, mode="auto", chat_template=template, fewshot=False)
    if style.template is None:
        raise ChatTemplateError(
            f"{record.name} has no chat template, and Magpie needs an instruct model's template (the model writes the "
            f"user's request by continuing the template's text before it): use an instruct model, or pass --chat-template "
            f"NAME|FILE (built-in: {', '.join(BUILTIN_TEMPLATES)}) for a model tuned on one", "config")
    return style


def run_magpie(
    store: Store, registry: Registry, loaded: LoadedRecipe, *, resume: int | None = None, new_run: bool = False,
    n_parallel: int | None = None, mode: str | None = None, chat_template: str | None = None,
    events: RunEvents | None = None, cluster: Any = None, name: str,
) -> RunSummary:
    """Run a magpie recipe (`run_recipe` hands these over): requests, their retries, answers, filters."""
    events = events or RunEvents()
    recipe = loaded.recipe
    params = SamplingParams(**recipe.sampling.model_dump(exclude_none=True))  # unset: the engine's defaults
    system_template = _system_template(loaded)
    record = registry.resolve(recipe.model)
    if cluster is not None:
        registry.ensure_sha256(record)
    magpie = Magpie(loaded, magpie_style(record, loaded, mode, chat_template), system_template)
    style = magpie.style
    run = find_resumable(store, name=name, kinds=("synthetic",), sha256=loaded.sha256,
                         config=("recipe", recipe.model_dump(by_alias=True)), what="recipe", resume=resume, new_run=new_run)
    if run is not None:
        style.check_resume(run)
        if run["status"] == "completed":
            summary = summarize(store, run["id"])
            summary.already_complete = True
            return summary
    items = magpie.request_items()
    if len(items) >= ITEM_LIMIT:
        raise ApplianceError(f"recipe {loaded.path} makes {len(items)} items; at most {ITEM_LIMIT - 1} fit one run")
    request_params = magpie.request_params(params)
    rubric = load_rubric(recipe.judge, loaded.resolve, registry, record, where=f"recipe {loaded.path}",
                         chat_template=chat_template or recipe.chat_template) if recipe.judge else None
    prompt_text, prompt_sha = magpie.prompt_row()
    with RunSession(store, record, events=events, n_parallel=n_parallel or recipe.parallel, cluster=cluster) as session:
        session.prepare([([it.prompt for it in items], request_params), (_answer_shapes(magpie, items, params), params),
                         *judge_workload(rubric, record, len(items), params)])
        prompt_id = store.save_prompt(PROMPT_NAME, prompt_text, prompt_sha, None)
        if run is None:
            run_id = session.begin(
                kind="synthetic", name=name, recipe_sha256=loaded.sha256, model_id=record.id,
                model_sha256=registry.ensure_sha256(record), prompt_id=prompt_id, requested=len(items), variables=recipe.vars,
                params={**params.model_dump(), "seed": recipe.seed},
                config={"recipe_path": loaded.path, "recipe": recipe.model_dump(by_alias=True)}, **style.run_fields(),
            )
        else:
            run_id = session.attach(run["id"])
        executions = [session.generate(items, request_params, prompt_id=prompt_id)]
        executions += run_retries(session, prompt_id, items, request_params, recipe.seed)
        answers = magpie.answer_items(store, run_id)
        todo = pending(store, run_id, answers)
        if todo:
            session.event("info", f"magpie: {len(answers)} of {len(items)} requests kept (the others' `request` verdicts "
                                  f"say why); answering {len(todo)}")
        executions.append(session.generate(answers, params, prompt_id=prompt_id))
        candidates = magpie.judge(store, run_id)
        if rubric is not None:
            executions.append(score_candidates(session, rubric, candidates, recipe.seed))
        store_judgement(store, run_id, recipe, candidates)
        session.complete()
        loads = session.loads
    summary = summarize(store, run_id)
    summary.execution, summary.model_loads, summary.resumed = merge(executions), loads, run is not None
    return summary


def _answer_shapes(magpie: Magpie, items: list[Item], params: SamplingParams) -> list[str]:
    """Stand-ins for the answers' prompts, to plan for them: requests at their longest (max_tokens words) after
    the first item's system prompt, two of them so that only the system prompt counts as a shared prefix."""
    system = system_message(json.dumps(items[0].messages)) if items else None
    head = [{"role": "system", "content": system}] if system is not None else []
    return [magpie.style.render([*head, {"role": "user", "content": " ".join([word] * params.max_tokens)}])[0]
            for word in ("word", "other")]
