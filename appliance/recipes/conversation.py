"""Conversation recipes: the model writes both sides of `turns` user/assistant exchanges, turn by turn.

    kind = "conversation"
    model = "smollm2-135m-instruct"
    prompt = "../prompts/conversation-assistant.md"     # the assistant's side (must use {{ passage }} when grounded)
    user_prompt = "../prompts/conversation-user.md"     # the user's side
    sources = ["sources/coriolanus-act1-excerpt.txt"]  # grounded: one conversation per chunk; without: count + axes
    turns = 2
    on_bad_turn = "drop"                                # or "cut": keep it up to its last good exchange
    [axes]
    persona = ["a curious student", "a theatre director"]
    goal = ["understand what happens in it"]

Generation goes in rounds: round (t, s) writes side s (0: the user's message, 1: the assistant's answer)
of turn t for every conversation still going, in one batched call (so the engine shares prompt
prefixes across conversations), at item index (2t + s) * ITEM_LIMIT + i (`appliance.runs.items`).

- Chat mode: the user's side is the model prompted with `user_prompt` (its system text and body; the
  body gets `history`, the conversation so far as `User:`/`Assistant:` lines, and `turn`, `turns`); the
  assistant's side gets `prompt` rendered (with the chunk) as its system message, then the real
  conversation as messages.
- Completion mode: one transcript layout: the side's prompt rendered (`history` empty), a blank line,
  then `User: ...` / `Assistant: ...` lines ending with the next speaker's marker; every turn stops at
  the other speaker's marker.

Each turn is cleaned (a repeated role prefix removed) and checked as it is stored: not empty, not cut
off, its length, the echo guard for a user message (against the chunk: a question that copies the
passage already holds its answer) and grounding for an answer (in the chunk). A conversation whose turn
fails stops there: no later turn is generated for it. The checks are deterministic, so a resumed run
(rows are stored as they complete) finds the same conversations still going and generates exactly the
missing turns. At the end each conversation becomes one example (`messages`: the turns in order), kept
when every turn passed, or with `on_bad_turn = "cut"` cut after its last good exchange; near
duplicates are found over whole conversations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..data.examples import SPEAKERS, transcript
from ..data.filters import (EchoGuard, NearDuplicateIndex, Verdict, check_grounded, check_length, check_not_empty,
                            check_truncated, echo_metrics)
from ..engine.types import SamplingParams
from ..errors import ApplianceError, ResumeError
from ..events import RunEvents
from ..models.registry import ModelRecord, Registry
from ..prompts.files import PromptFile, load_prompt, sampling_for
from ..runs.items import ITEM_LIMIT, MAX_TURNS, Execution, Item, item_seeds, merge
from ..runs.rubric import Rubric, judge_workload
from ..runs.session import RunSession
from ..runs.style import PromptStyle
from ..runs.summary import RunSummary, summarize
from ..store import Store
from . import fidelity
from .build import PASSAGE_VAR, axis_combinations
from .judge import Candidate, score_candidates, store_judgement
from .recipe import Filters, LoadedRecipe, Recipe

SIDES = ("user", "assistant")
TURN_STOPS = ["\nUser:", "\nAssistant:"]  # a turn ends where the model starts writing the other speaker's (or its own next) line
TURN_VARS = ("history", "turn", "turns")  # what the user's prompt may use besides the recipe's values
HISTORY_VAR = "history"
_ROLE_PREFIX = re.compile(r"^\s*[*_]*(?:user|assistant|human|ai|person)[*_]*\s*:[*_]*\s*", re.IGNORECASE)


class ConversationError(ApplianceError):
    """A conversation recipe whose prompts do not fit it."""


@dataclass
class Conversation:
    """One conversation's fixed inputs: its index, the values of its axes and vars, and its chunk."""

    index: int
    seed: int
    values: dict[str, Any]
    chunk_id: int | None = None
    chunk: str | None = None


def turn_index(conversation: int, turn: int, side: int) -> int:
    """The item index of side `side` (0 user, 1 assistant) of turn `turn` (from 0) of a conversation."""
    return (2 * turn + side) * ITEM_LIMIT + conversation


def position(index: int) -> tuple[int, int]:
    """(conversation, position) of an item index: position 2t + s is side s of turn t."""
    return index % ITEM_LIMIT, index // ITEM_LIMIT


def clean_turn(text: str) -> str:
    """A turn without surrounding whitespace, leading role prefixes the model repeated ("User: ...") and
    the quotes a model may wrap a whole message in."""
    text = text.strip()
    while (m := _ROLE_PREFIX.match(text)) is not None and m.end() < len(text):
        text = text[m.end():].strip()
    if _ROLE_PREFIX.fullmatch(text):
        return ""
    if len(text) > 1 and text[0] == text[-1] == '"' and '"' not in text[1:-1]:
        text = text[1:-1].strip()
    return text


# ------------------------------------------------------------------------------------------ inputs


def load_inputs(loaded: LoadedRecipe, prompt: PromptFile) -> PromptFile:
    """The user's prompt file, after checking both prompts fit the recipe (before anything is loaded)."""
    recipe = loaded.recipe
    user_prompt = load_prompt(loaded.resolve(recipe.user_prompt or ""))
    fidelity.load_checks(loaded)  # refuses filters.fidelity (synthetic only)
    where = f"recipe {loaded.path}"
    if recipe.schema_file:
        raise ConversationError(f"{where}: key 'schema': conversation turns are free text, not JSON")
    if prompt.turns or prompt.header.system is not None:
        raise ConversationError(f"prompt {prompt.path}: the assistant's prompt of a conversation is its system message: write it "
                                "as the body, without a system key or ### turns (the conversation gives the turns)")
    grounded = bool(recipe.sources)
    if grounded and PASSAGE_VAR not in prompt.variables:
        raise ConversationError(f"prompt {prompt.path} must use {{{{ {PASSAGE_VAR} }}}}: the assistant answers from the chunk "
                                f"(its variables: {', '.join(prompt.variables) or 'none'})")
    for values, what in ((recipe.axes, "axis"), (recipe.vars, "[vars]")):
        unused = [n for n in values if n not in prompt.variables and n not in user_prompt.variables]
        if unused:
            raise ConversationError(f"{where}: {what} {', '.join(repr(u) for u in unused)} not used by prompt {prompt.path} "
                                    f"or user_prompt {user_prompt.path}")
    base = set(recipe.vars) | set(recipe.axes) | ({PASSAGE_VAR} if grounded else set())
    for p, extra in ((prompt, set()), (user_prompt, set(TURN_VARS))):
        missing = [v for v in p.variables if v not in base | extra | set(p.header.vars)]
        if missing:
            why = " (an ungrounded conversation recipe, without sources, has no passage)" if PASSAGE_VAR in missing else ""
            raise ConversationError(f"prompt {p.path} uses {', '.join(repr(m) for m in missing)}, which recipe {loaded.path} "
                                    f"does not give{why} (add to [vars] or [axes])")
    return user_prompt


def conversations(recipe: Recipe, prompts: tuple[PromptFile, PromptFile], chunks: list[dict[str, Any]]) -> list[Conversation]:
    """Every conversation of the run, fully determined by the recipe (and its sources): one per chunk
    (at most `count`), or `count` from the axes alone."""
    chosen: list[dict[str, Any] | None] = list(chunks[: recipe.count] if recipe.count else chunks) if recipe.sources else [None] * (recipe.count or 0)
    if len(chosen) >= ITEM_LIMIT:
        raise ConversationError(f"the recipe makes {len(chosen)} conversations; at most {ITEM_LIMIT - 1} fit one run")
    assignments = axis_combinations(recipe.axes, len(chosen), recipe.seed)
    out = []
    for i, (chunk, axes, seed) in enumerate(zip(chosen, assignments, item_seeds(recipe.seed, len(chosen)))):
        values = {**prompts[1].values_for_item(recipe.vars, seed), **prompts[0].values_for_item(recipe.vars, seed), **axes}
        out.append(Conversation(i, seed, values, chunk["id"] if chunk else None, chunk["text"] if chunk else None))
    return out


def side_params(prompt: PromptFile, recipe: Recipe) -> SamplingParams:
    """One side's sampling: the engine's defaults, its prompt file's header, the recipe's [sampling]; the
    speaker markers always stop a turn."""
    overrides = recipe.sampling.model_dump(exclude={"stop"})
    params = sampling_for(prompt, overrides | ({"stop": recipe.sampling.stop} if recipe.sampling.stop is not None else {}))
    return params.model_copy(update={"stop": [*params.stop, *(s for s in TURN_STOPS if s not in params.stop)]})


# ------------------------------------------------------------------------------------------ items


def turn_item(style: PromptStyle, prompts: tuple[PromptFile, PromptFile], conv: Conversation, turn: int, side: int,
              messages: list[dict[str, str]], turns: int, base_seed: int) -> Item:
    """The item that writes side `side` of turn `turn` of `conv`, after `messages` (the turns so far, cleaned)."""
    prompt = prompts[side]
    index = turn_index(conv.index, turn, side)
    variables = {**conv.values, "turn": turn + 1, "role": SIDES[side]}
    fields = {"index": index, "seed": item_seeds(base_seed, 1, start=index)[0], "variables": variables, "chunk_id": conv.chunk_id}
    user_values = {**conv_values(conv), "turn": turn + 1, "turns": turns}
    if not style.chat:
        opening = prompt.render_completion({**user_values, HISTORY_VAR: ""}) if side == 0 else assistant_system(prompt, conv)
        lines = [*([transcript(messages)] if messages else []), f"{SPEAKERS[SIDES[side]]}:"]
        return style.message_item(f"{opening.rstrip()}\n\n" + "\n".join(lines), **fields)
    if side == 0:
        chat = prompt.render_messages({**user_values, HISTORY_VAR: transcript(messages)})
    else:
        chat = [{"role": "system", "content": assistant_system(prompt, conv)}, *messages]
    return style.message_item(chat, **fields)


def conv_values(conv: Conversation) -> dict[str, Any]:
    """The values a conversation's prompts are rendered with: its axes and vars, and its chunk as `passage`."""
    return {**conv.values, **({PASSAGE_VAR: conv.chunk} if conv.chunk is not None else {})}


def assistant_system(prompt: PromptFile, conv: Conversation) -> str:
    """The assistant's instructions (with the chunk): its system message in chat mode, the transcript's opening
    in completion mode, and the system message exported with the conversation (unless the recipe sets `system`)."""
    return prompt.render(conv_values(conv)).strip()


# ------------------------------------------------------------------------------------------ checks


def check_turn(text: str, finish_reason: str | None, side: int, chunk: str | None, f: Filters, previous: str | None = None) -> list[Verdict]:
    """Every filter's verdict on one turn (cleaned text): deterministic, so a resumed run judges alike.
    A user message is held against the chunk (a question that copies the passage holds its answer) and
    against the answer before it (a "question" that repeats it asks nothing)."""
    verdicts = [check_not_empty(text), check_truncated(finish_reason, allow_truncated=f.allow_truncated)]
    if f.min_words is not None or f.max_words is not None:
        verdicts.append(check_length(text, min_words=f.min_words, max_words=f.max_words))
    if side == 0 and text and (chunk is not None or previous):
        guard = EchoGuard(max_length_ratio=f.echo_max_length_ratio, max_ngram_overlap=f.echo_max_ngram_overlap,
                          max_shared_run=f.echo_max_shared_run)
        v = guard.judge(echo_metrics(text, chunk)) if chunk is not None else None
        if previous and (v is None or v.passed):  # against the answer: copying counts, not length
            v = guard.model_copy(update={"max_length_ratio": float("inf")}).judge(echo_metrics(text, previous))
            v = v.model_copy(update={"reason": v.reason.replace("output", "previous answer") if not v.passed else v.reason})
        assert v is not None
        reason = v.reason.replace("instruction", "the user's message").replace("output", "passage")
        verdicts.append(v.model_copy(update={"reason": reason}))
    if chunk is not None and text and side == 1:
        verdicts.append(check_grounded(text, chunk, min_score=f.grounding_min_score))
    return verdicts


@dataclass
class Progress:
    """How far a conversation got: its stored turns in order (each: generation row, cleaned text,
    verdicts), whether it is still going, and the position of its first missing turn."""

    turns: list[tuple[dict[str, Any], str, list[Verdict]]]
    going: bool
    next: int

    def messages(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": SIDES[p % 2], "content": text} for p, (_, text, _) in enumerate(self.turns[:upto])]


def progress(conv: Conversation, stored: dict[int, dict[str, Any]], f: Filters, turns: int) -> Progress:
    """Walk a conversation's stored turns in order, checking each, until a missing or failing one."""
    out = Progress([], True, 0)
    for p in range(2 * turns):
        g = stored.get(p)
        if g is None:
            out.next = p
            return out
        text = clean_turn(g["output"])
        verdicts = check_turn(text, g["finish_reason"], p % 2, conv.chunk, f, out.turns[-1][1] if out.turns else None)
        out.turns.append((g, text, verdicts))
        if not all(v.passed for v in verdicts):
            out.going, out.next = False, p + 1
            return out
    out.going, out.next = False, 2 * turns
    return out


def stored_turns(store: Store, run_id: int) -> dict[int, dict[int, dict[str, Any]]]:
    """conversation -> position -> its generation (id, output, finish_reason): the columns the rounds and the
    judge read (not the rendered prompt, which grows with every turn)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for g in store.rows("SELECT id, item_index, output, finish_reason FROM generations "
                        "WHERE run_id = ? AND item_index < ?", [run_id, 2 * MAX_TURNS * ITEM_LIMIT]):
        conversation, p = position(g["item_index"])
        out.setdefault(conversation, {})[p] = g
    return out


# ------------------------------------------------------------------------------------------ rounds


def run_rounds(session: RunSession, style: PromptStyle, prompts: tuple[PromptFile, PromptFile], prompt_ids: tuple[int, int],
               params: tuple[SamplingParams, SamplingParams], convs: list[Conversation], recipe: Recipe) -> list[Execution]:
    """Generate every missing turn, one round (turn, side) at a time: each round asks for that side of that
    turn of every conversation still going, in one batched call."""
    turns, executions = recipe.turns or 1, []
    for p in range(2 * turns):
        turn, side = divmod(p, 2)
        stored = stored_turns(session.store, session.run_id or 0)
        items = []
        for conv in convs:
            done = progress(conv, stored.get(conv.index, {}), recipe.filters, turns)
            if done.going and done.next == p:
                items.append(turn_item(style, prompts, conv, turn, side, done.messages(), turns, recipe.seed))
        if items:
            session.event("info", f"turn {turn + 1} of {turns}, {SIDES[side]}: {len(items)} conversation{'s' if len(items) > 1 else ''}")
            executions.append(session.generate(items, params[side], prompt_id=prompt_ids[side]))
    return executions


def planning_workloads(style: PromptStyle, prompts: tuple[PromptFile, PromptFile], params: tuple[SamplingParams, SamplingParams],
                       convs: list[Conversation], turns: int, base_seed: int) -> list[tuple[list[str], SamplingParams]]:
    """What to plan the context for, once: each side's first prompts, with room for the whole conversation
    that later rounds add to them (every turn's tokens and its template's markers)."""
    grows = turns * (params[0].max_tokens + params[1].max_tokens + 32)
    return [([turn_item(style, prompts, c, 0, side, [] if side == 0 else [{"role": "user", "content": "?"}], turns, base_seed).prompt
              for c in convs], params[side].model_copy(update={"max_tokens": params[side].max_tokens + grows})) for side in (0, 1)]


# ------------------------------------------------------------------------------------------ judging


def judge_conversations(recipe: Recipe, prompt: PromptFile, convs: list[Conversation],
                        stored: dict[int, dict[int, dict[str, Any]]]) -> list[Candidate]:
    """Every turn's verdicts and one example per conversation, in conversation order: kept when every turn
    passed, or (on_bad_turn = "cut") cut after its last good exchange; then near duplicates over whole
    conversations. The example hangs on its last turn (a dropped one: the turn that failed); the other
    turns are candidates marked `replaced` (verdicts, no example)."""
    f, turns = recipe.filters, recipe.turns or 1
    dedup = NearDuplicateIndex(threshold=f.near_duplicate_threshold) if f.near_duplicate_threshold else None
    out: list[Candidate] = []
    for conv in convs:
        done = progress(conv, stored.get(conv.index, {}), f, turns)
        if not done.turns:
            continue
        failed = not all(v.passed for v in done.turns[-1][2])
        keep = 2 * ((len(done.turns) - failed) // 2) if recipe.on_bad_turn == "cut" or not failed else 0
        last = keep - 1 if keep else len(done.turns) - 1
        messages = done.messages(keep or None)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        for p, (g, text, verdicts) in enumerate(done.turns):  # in turn order
            if p != last:
                out.append(Candidate(g["id"], conv.index, "", "", text, conv.chunk_id, list(verdicts), replaced=True))
                continue
            cand = Candidate(g["id"], conv.index, messages[0]["content"], "", answers[-1] if answers else "", conv.chunk_id,
                             list(verdicts), messages=messages)
            cand.system = recipe.system if recipe.system is not None else assistant_system(prompt, conv)
            if dedup is not None and cand.kept:  # over the whole conversation (its sketch is stored with the example)
                cand.signature = dedup.signature("\n".join(m["content"] for m in messages))
                cand.verdicts.append(dedup.check(str(conv.index + 1), cand.signature))
            out.append(cand)
    return out


# ------------------------------------------------------------------------------------------ the run


def check_user_prompt(store: Store, run_id: int | None, user_prompt: PromptFile) -> None:
    """Refuse to continue a run whose user prompt changed (the run's own prompt is checked by `find_run`)."""
    if run_id is None:
        return
    config = json.loads(store.rows("SELECT config_json FROM runs WHERE id = ?", [run_id])[0]["config_json"] or "{}")
    if config.get("user_prompt_sha256") not in (None, user_prompt.sha256):
        raise ResumeError(f"prompt {user_prompt.path} changed since run {run_id}; use --new-run to start over")


def run_conversation(store: Store, registry: Registry, loaded: LoadedRecipe, prompts: tuple[PromptFile, PromptFile],
                     rubric: Rubric | None, *,
                     record: ModelRecord, style: PromptStyle, run_id: int | None, name: str, chunks: list[dict[str, Any]],
                     skipped: list[tuple[str, str]], events: RunEvents, n_parallel: int | None = None, cluster: Any = None) -> RunSummary:
    """Make (or continue) a conversation run: `prompts` is (user_prompt, prompt), side 0 and side 1; `rubric`: the
    recipe's judge, loaded as every recipe kind's is (`run_recipe`)."""
    recipe = loaded.recipe
    check_user_prompt(store, run_id, prompts[0])
    convs = conversations(recipe, prompts, chunks)
    params = (side_params(prompts[0], recipe), side_params(prompts[1], recipe))
    resumed = run_id is not None
    with RunSession(store, record, events=events, n_parallel=n_parallel or recipe.parallel, cluster=cluster) as session:
        session.prepare([*planning_workloads(style, prompts, params, convs, recipe.turns or 1, recipe.seed),
                         *judge_workload(rubric, record, len(convs), params[1])])
        prompt_ids = tuple(store.save_prompt(p.name, p.text, p.sha256, p.path) for p in prompts)
        if run_id is None:
            run_id = session.begin(
                kind=recipe.kind, name=name, recipe_sha256=loaded.sha256, model_id=record.id,
                model_sha256=registry.ensure_sha256(record), prompt_id=prompt_ids[1], requested=len(convs),
                variables=recipe.vars, params={**params[1].model_dump(), "seed": recipe.seed, "user": params[0].model_dump()},
                config={"recipe_path": loaded.path, "recipe": recipe.model_dump(by_alias=True),
                        "user_prompt_sha256": prompts[0].sha256}, **style.run_fields(),
            )
            for path, reason in skipped:
                store.event(run_id, "warning", f"skipped source {path}: {reason}")
        else:
            session.attach(run_id)
        executions = run_rounds(session, style, prompts, prompt_ids, params, convs, recipe)
        candidates = judge_conversations(recipe, prompts[1], convs, stored_turns(store, run_id))
        if rubric is not None:  # each kept conversation's last answer, with the turns before it as the instruction
            executions.append(score_candidates(session, rubric, candidates, recipe.seed))
        store_judgement(store, run_id, recipe, candidates)
        execution = merge(executions)
        session.complete()
        loads = session.loads
    summary = summarize(store, run_id)
    summary.execution, summary.model_loads, summary.resumed = execution, loads, resumed
    return summary
