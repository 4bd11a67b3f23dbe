"""A recipe run's filters: every verdict for the final attempt of every item, and the run's verdicts and
examples replaced in one transaction, so a resumed run ends with the same result as an uninterrupted one.

- synthetic: instruction = the recipe's `instruction` template over the axes, output = the model's text;
- annotated: instruction = the model's text, output = the ORIGINAL chunk, guarded against echoes;
- augmented: question (+ the chunk as input) -> answer, checked for grounding in its chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jinja2.sandbox

from ..data.examples import transcript
from ..data.filters import (EchoGuard, NearDuplicateIndex, Signature, Verdict, check_grounded, check_json, check_length, check_not_empty,
                            check_truncated, cue_verdict, echo_metrics)
from ..data.sketches import add_minhashes
from ..runs.items import JUDGE_BASE, Execution
from ..runs.rubric import Judged, Rubric, judge_verdicts, run_judge
from ..runs.session import RunSession
from ..runs.summary import fidelity_labels
from ..store import Store, insert_row, to_json, utcnow
from . import fidelity
from .recipe import Recipe
from .retry import attempt_of, attempts, cleaned


@dataclass
class Candidate:
    generation_id: int
    item_index: int
    instruction: str
    input: str
    output: str
    chunk_id: int | None
    verdicts: list[Verdict] = field(default_factory=list)
    echo: dict[str, Any] | None = None
    replaced: bool = False  # no example of its own (an empty attempt generated again, a preference response, a conversation's
    # other turns): its verdicts are kept, it makes no example
    system: str | None = None  # the system text the model was given (chat mode), or the recipe's `system`
    signature: Signature | None = None  # the duplicate filter's MinHash of its text: stored with the example when it fits
    rejected: str | None = None  # a preference pair's worse response (`output` is the chosen one)
    rejected_generation_id: int | None = None
    messages: list[dict[str, str]] | None = None  # a conversation's turns (`appliance.recipes.conversation`)

    @property
    def kept(self) -> bool:
        return all(v.passed for v in self.verdicts)


_QA = re.compile(r"^\s*(?P<q>.+?)\s*\n+\s*Answer:\s*(?P<a>.+?)\s*$", re.S)


def parse_qa(text: str) -> tuple[str, str] | None:
    """Question and answer from an augmented output: JSON {"question", "answer"} or text "...\\nAnswer: ..."."""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("question"), str) and isinstance(data.get("answer"), str):
            return data["question"].strip(), data["answer"].strip()
    except json.JSONDecodeError:
        pass
    m = _QA.match(text)
    return (m["q"].removeprefix("Question:").strip(), m["a"].strip()) if m else None


def judge(recipe: Recipe, gens: list[dict[str, Any]], chunks: dict[int, str], schema: dict | None) -> list[Candidate]:
    """Every filter's verdict for the final attempt of every item, in item order (an empty attempt that was
    generated again gets a `not_empty` verdict naming its replacement, and no example)."""
    f = recipe.filters
    guard = EchoGuard(max_length_ratio=f.echo_max_length_ratio, max_ngram_overlap=f.echo_max_ngram_overlap, max_shared_run=f.echo_max_shared_run)
    dedup = NearDuplicateIndex(threshold=f.near_duplicate_threshold) if f.near_duplicate_threshold else None
    instruction_template = INSTRUCTION_ENV.from_string(recipe.instruction) if recipe.instruction else None
    finals, superseded = attempts(gens)
    labelled = fidelity_labels(gens)
    replaced_by_item: dict[int, list[dict[str, Any]]] = {}
    for g in gens:
        if g["id"] in superseded:
            replaced_by_item.setdefault(attempt_of(g["item_index"])[0], []).append(g)
    out: list[Candidate] = []
    for g in finals:
        item = attempt_of(g["item_index"])[0]
        for old in replaced_by_item.get(item, []):
            cand = Candidate(old["id"], item, "", "", "", old["chunk_id"], replaced=True)
            cand.verdicts.append(Verdict(filter="not_empty", passed=False,
                                         reason=f"output is empty; generated again with a new seed as item {superseded[old['id']]}"))
            out.append(cand)
        text, cue, n_cue = cleaned(g["output"], g["rendered_prompt"])
        chunk = chunks.get(g["chunk_id"]) if g["chunk_id"] else None
        variables = json.loads(g["variables_json"] or "{}")
        if recipe.kind == "synthetic":
            instruction = instruction_template.render(**variables) if instruction_template else _describe(variables)
            cand = Candidate(g["id"], item, instruction, "", text, None)
            checked = text
        elif recipe.kind == "annotated":
            cand = Candidate(g["id"], item, text, "", (chunk or "").strip(), g["chunk_id"])
            checked = text
        else:
            qa = parse_qa(text)
            question, answer = qa if qa else ("", "")
            cand = Candidate(g["id"], item, question, (chunk or "").strip(), answer, g["chunk_id"])
            checked = answer
            cand.verdicts.append(Verdict(filter="parse", passed=qa is not None,
                                         reason="question and answer found" if qa else "no 'Answer:' after the question"))
        if n_cue:
            cand.verdicts.insert(0, cue_verdict(cue or "", n_cue))
        cand.verdicts.append(check_not_empty(text))
        cand.verdicts.append(check_truncated(g["finish_reason"], allow_truncated=f.allow_truncated))
        if f.min_words is not None or f.max_words is not None:
            cand.verdicts.append(check_length(checked, min_words=f.min_words, max_words=f.max_words))
        if schema is not None:
            cand.verdicts.append(check_json(text, schema))
        if g["id"] in labelled:
            cand.verdicts.append(fidelity.verdict(labelled[g["id"]]))
        if recipe.kind == "annotated" and text:
            metrics = echo_metrics(cand.instruction, cand.output)
            cand.echo = metrics.model_dump()
            cand.verdicts.append(guard.judge(metrics))
        if recipe.kind == "augmented" and answer:
            cand.verdicts.append(check_grounded(answer, chunk or "", min_score=f.grounding_min_score))
        if dedup is not None and cand.kept:
            cand.signature = dedup.signature(f"{cand.instruction}\n{cand.output}")
            cand.verdicts.append(dedup.check(str(item + 1), cand.signature))
        cand.system = recipe.system if recipe.system is not None else system_message(g.get("messages_json"))
        out.append(cand)
    return out


INSTRUCTION_ENV = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def _describe(variables: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in sorted(variables.items()))


def system_message(messages_json: str | None) -> str | None:
    """The system message a chat-mode generation was prompted with (what exported examples carry), else None."""
    messages = json.loads(messages_json) if messages_json else []
    return next((m["content"] for m in messages if m.get("role") == "system"), None)


# What the filters read of a generation (`judge`, `attempts`, `fidelity_labels`): not the whole row, whose
# prompts and timings would be held in memory for every generation of the run.
JUDGED_COLUMNS = "id, item_index, output, rendered_prompt, chunk_id, variables_json, finish_reason, messages_json"


def score_candidates(session: RunSession, rubric: Rubric, candidates: list[Candidate], seed: int) -> Execution | None:
    """The rubric judge over the candidates that passed every filter (those it has not scored yet); each
    one's `judge` verdict joins its others. Returns the judge stage's execution (None: nothing to score)."""
    store, run_id = session.store, session.run_id
    ids = [c.generation_id for c in candidates if c.kept and not c.replaced]
    index_of = dict(store.conn.execute(
        "SELECT id, item_index FROM generations WHERE run_id = ? AND item_index < ?", [run_id, JUDGE_BASE]).fetchall())
    by_id = {c.generation_id: c for c in candidates if not c.replaced}
    todo = [_judged(by_id[i], index_of[i]) for i in ids]
    scored = run_judge(session, rubric, todo, seed)
    verdicts = judge_verdicts(rubric.config, store.rows(
        f"SELECT {JUDGED_COLUMNS} FROM generations WHERE run_id = ? AND item_index >= ?", [run_id, JUDGE_BASE]))
    for generation_id, c in by_id.items():
        if generation_id in verdicts:
            c.verdicts.append(verdicts[generation_id])
    return scored


def _judged(c: Candidate, index: int) -> Judged:
    """What the judge reads of a candidate: its instruction and output; for a conversation, its last answer,
    with every turn before it (one per line, "User: ..." / "Assistant: ...") as the instruction."""
    if c.messages and len(c.messages) > 2:
        before = transcript(c.messages[:-1])
        return Judged(c.generation_id, index, before, c.messages[-1]["content"], c.input)
    return Judged(c.generation_id, index, c.instruction, c.output, c.input)


def store_judgement(store: Store, run_id: int, recipe: Recipe, candidates: list[Candidate]) -> None:
    """Replace the run's verdicts and examples in one transaction (each kept example with its MinHash)."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM verdicts WHERE run_id = ?", [run_id])
        conn.execute("DELETE FROM examples WHERE run_id = ?", [run_id])
        examples, signatures = [], []
        for c in candidates:
            for v in c.verdicts:
                insert_row(conn, "verdicts", {"run_id": run_id, "generation_id": c.generation_id, "filter": v.filter,
                                              "passed": int(v.passed), "score": v.score, "reason": v.reason,
                                              "detail_json": to_json(v.detail) if v.detail is not None else None})
            if c.replaced:
                continue
            examples.append({
                "run_id": run_id, "generation_id": c.generation_id, "chunk_id": c.chunk_id,
                "instruction": c.instruction, "input": c.input, "output": c.output, "system": c.system,
                "label": None, "group_key": f"chunk:{c.chunk_id}" if c.chunk_id else f"item:{c.item_index}",
                "kept": int(c.kept), "created_at": utcnow(),
                "rejected": c.rejected, "rejected_generation_id": c.rejected_generation_id,
                "messages_json": to_json(c.messages) if c.messages else None,
            })
            signatures.append(c.signature)
        add_minhashes(examples, signatures)
        for row in examples:
            insert_row(conn, "examples", row)
