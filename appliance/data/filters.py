"""Filters: each looks at one output and gives a `Verdict` with a short, human reason.

Filter names (the `filter` field, as stored in the `verdicts` table): `not_empty`, `truncated`, `length`,
`json`, `fidelity`, `echo`, `grounded`, `duplicate`; `cue` records a stripped echo of the prompt's cue line. Every check is deterministic: the same text gives the same verdict.
"""

from __future__ import annotations

import difflib
import json
import math
import statistics
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ApplianceError
from .minhash import BATCH_TEXTS, Signature, Sketch, minhash_values, words, words_digest

if TYPE_CHECKING:
    import jsonschema



class QualityError(ApplianceError):
    """A filter configured wrongly, e.g. an output schema that is not a valid JSON Schema."""


class Verdict(BaseModel):
    filter: str
    passed: bool
    score: float | None = None
    reason: str
    detail: dict[str, Any] | None = None  # stored as verdicts.detail_json (the rubric judge's score per criterion)


def _pct(value: float) -> str:
    return f"{value:.0%}"


# ---------------------------------------------------------------------------------------------
# Echo guard: an instruction that restates its output trains a parrot, not a writer.


class EchoMetrics(BaseModel):
    instruction_words: int
    output_words: int
    length_ratio: float = Field(description="instruction words / output words (inf for an output without words)")
    ngram_overlap: float = Field(description="share of the output's word n-grams also found in the instruction")
    longest_shared_run: int = Field(
        description="longest run of consecutive output words found verbatim in the instruction"
    )


def echo_metrics(instruction: str, output: str, n: int = 3) -> EchoMetrics:
    """Measure how much of `output` the instruction already gives away.

    The overlap counts n-gram positions in the output; an output shorter than n words uses n-grams
    of its own length, so a two-word output copied into the instruction still counts as copied.
    """
    ins, out = words(instruction), words(output)
    if out:
        size = min(n, len(out))
        ins_grams = {tuple(ins[i : i + size]) for i in range(len(ins) - size + 1)}
        out_grams = [tuple(out[i : i + size]) for i in range(len(out) - size + 1)]
        overlap = sum(g in ins_grams for g in out_grams) / len(out_grams)
        ratio = len(ins) / len(out)
    else:
        overlap, ratio = 0.0, math.inf if ins else 0.0
    run = difflib.SequenceMatcher(None, out, ins, autojunk=False).find_longest_match(0, len(out), 0, len(ins)).size
    return EchoMetrics(
        instruction_words=len(ins),
        output_words=len(out),
        length_ratio=ratio,
        ngram_overlap=overlap,
        longest_shared_run=run,
    )


class EchoGuard(BaseModel):
    """Thresholds of the echo guard; a pair fails when any one is exceeded."""

    model_config = ConfigDict(extra="forbid")

    max_length_ratio: float = Field(
        default=1.0, gt=0, description="an instruction this long relative to the output, or longer, fails"
    )
    max_ngram_overlap: float = Field(default=0.3, ge=0, le=1)
    max_shared_run: int = Field(
        default=12, ge=1, description="longest verbatim run of output words allowed in the instruction"
    )
    n: int = Field(default=3, ge=1)

    def check(self, instruction: str, output: str) -> Verdict:
        return self.judge(echo_metrics(instruction, output, self.n))

    def judge(self, m: EchoMetrics) -> Verdict:
        """The verdict for metrics already measured (with this guard's `n`); score = n-gram overlap."""
        problems = []
        if m.output_words == 0:
            problems.append("the output has no words")
        elif m.length_ratio >= self.max_length_ratio:
            problems.append(
                f"instruction is {m.length_ratio:.2f}x the output's length "
                f"({m.instruction_words} vs {m.output_words} words; limit below {self.max_length_ratio:g}x)"
            )
        if m.ngram_overlap > self.max_ngram_overlap:
            problems.append(
                f"instruction repeats {_pct(m.ngram_overlap)} of the output's word {self.n}-grams "
                f"(limit {_pct(self.max_ngram_overlap)})"
            )
        if m.longest_shared_run > self.max_shared_run:
            problems.append(
                f"instruction copies a run of {m.longest_shared_run} output words (limit {self.max_shared_run})"
            )
        reason = "; ".join(problems) or (
            f"ratio {m.length_ratio:.2f}, {self.n}-gram overlap {_pct(m.ngram_overlap)}, "
            f"longest shared run {m.longest_shared_run} words"
        )
        return Verdict(filter="echo", passed=not problems, score=m.ngram_overlap, reason=reason)


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks of a sorted, non-empty list."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or ordered[hi] == ordered[lo]:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_echo(metrics: list[EchoMetrics]) -> dict:
    """Distribution of the echo measures over a run: `{"count", "length_ratio": {min, median, p90, max}, ...}`."""
    summary: dict = {"count": len(metrics)}
    if not metrics:
        return summary
    for field in ("length_ratio", "ngram_overlap", "longest_shared_run"):
        values = sorted(float(getattr(m, field)) for m in metrics)
        summary[field] = {
            "min": values[0],
            "median": statistics.median(values),
            "p90": _quantile(values, 0.9),
            "max": values[-1],
        }
    return summary


# ---------------------------------------------------------------------------------------------
# Simple checks.


def check_not_empty(text: str) -> Verdict:
    """Fail an empty or whitespace-only output."""
    if not text.strip():
        return Verdict(filter="not_empty", passed=False, reason="output is empty")
    return Verdict(filter="not_empty", passed=True, reason="output has text")


def check_truncated(finish_reason: str | None, allow_truncated: bool = False) -> Verdict:
    """Fail an output cut off by the token limit (`finish_reason == "length"`): it stops mid-thought."""
    if finish_reason == "length" and not allow_truncated:
        return Verdict(filter="truncated", passed=False, reason="output was cut off at the token limit")
    how = "cut off at the token limit (allowed)" if finish_reason == "length" else f"output ended on its own ({finish_reason})"
    return Verdict(filter="truncated", passed=True, reason=how)


def cue_line(prompt: str) -> str | None:
    """The prompt's last line when it is a cue the model answers after ("Review:", "Answer:"), else None."""
    last = prompt.rstrip().rsplit("\n", 1)[-1].strip()
    return last if last.endswith(":") and 1 < len(last) <= 40 else None


def strip_cue(text: str, cue: str | None) -> tuple[str, int]:
    """`text` without leading echoes of the prompt's cue line (a base model may repeat "Review:" before
    answering), and how many were removed."""
    if not cue:
        return text, 0
    n = 0
    rest = text.lstrip()
    while rest[: len(cue)].lower() == cue.lower():
        rest, n = rest[len(cue):].lstrip(), n + 1
    return (rest, n) if n else (text, 0)


def cue_verdict(cue: str, n: int) -> Verdict:
    """The record of a stripped cue echo (it passes: the output was kept without it)."""
    times = "" if n == 1 else f" ({n} times)"
    return Verdict(filter="cue", passed=True, score=float(n), reason=f"removed a leading echo of the prompt's cue line {cue!r}{times}")


def check_length(
    text: str,
    min_words: int | None = None,
    max_words: int | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
) -> Verdict:
    """Bounds on whitespace-separated words and on characters (of the stripped text); score = words."""
    stripped = text.strip()
    n_words, n_chars = len(stripped.split()), len(stripped)
    problems = []
    if min_words is not None and n_words < min_words:
        problems.append(f"{n_words} words, fewer than {min_words}")
    if max_words is not None and n_words > max_words:
        problems.append(f"{n_words} words, more than {max_words}")
    if min_chars is not None and n_chars < min_chars:
        problems.append(f"{n_chars} characters, fewer than {min_chars}")
    if max_chars is not None and n_chars > max_chars:
        problems.append(f"{n_chars} characters, more than {max_chars}")
    reason = "; ".join(problems) or f"{n_words} words, {n_chars} characters"
    return Verdict(filter="length", passed=not problems, score=float(n_words), reason=reason)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=32)
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    import jsonschema  # here, not at the top: 40 ms that only JSON checks need (export does not)

    schema = json.loads(schema_json)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise QualityError(f"invalid JSON schema at {exc.json_path}: {_one_line(exc.message)}") from None
    return jsonschema.Draft202012Validator(schema)


def json_validator(schema: dict) -> jsonschema.Draft202012Validator:
    """A Draft 2020-12 validator for `schema` (cached); a schema that is itself invalid is a QualityError."""
    return _validator(json.dumps(schema, sort_keys=True))


def check_json(text: str, schema: dict | None = None) -> Verdict:
    """The output parses as JSON and, when a schema is given, validates against it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Verdict(filter="json", passed=False, reason=f"not valid JSON: {exc}")
    if schema is not None:
        from jsonschema.exceptions import best_match

        error = best_match(json_validator(schema).iter_errors(value))
        if error is not None:
            return Verdict(filter="json", passed=False, reason=f"schema: {error.json_path}: {_one_line(error.message)}")
        return Verdict(filter="json", passed=True, reason="valid JSON, matches the schema")
    return Verdict(filter="json", passed=True, reason="valid JSON")


# ---------------------------------------------------------------------------------------------
# Grounding: does an answer draw on its source chunk?

STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each either else ever every few for from
    further had has have having he her here hers herself him himself his how however i if in into is it its
    itself just let like may me might more most much must my myself neither no nor not now of off on once
    only or other ought our ours ourselves out over own same shall she should since so some such than that
    the their theirs them themselves then there these they this those though through thus to too under
    until up upon us very was we were what when where whether which while who whom whose why will with
    within without would yes yet you your yours yourself yourselves
    """.split()
)


def content_words(text: str) -> set[str]:
    """Distinct lowercase words of 3+ characters that are not English stopwords."""
    return {w for w in words(text) if len(w) >= 3 and w not in STOPWORDS}


def grounding_score(answer: str, source: str) -> float:
    """Share of the answer's distinct content words that occur in the source (0.0 for an answer without any)."""
    answer_words = content_words(answer)
    if not answer_words:
        return 0.0
    source_words = set(words(source))
    return len(answer_words & source_words) / len(answer_words)


def check_grounded(answer: str, source: str, min_score: float = 0.5) -> Verdict:
    """Pass an answer when at least `min_score` of its content words occur in the source; score = the share."""
    answer_words = content_words(answer)
    if not answer_words:
        return Verdict(filter="grounded", passed=False, score=0.0, reason="answer has no content words")
    score = grounding_score(answer, source)
    found = round(score * len(answer_words))
    reason = (
        f"{found} of {len(answer_words)} content words ({_pct(score)}) occur in the source (minimum {_pct(min_score)})"
    )
    return Verdict(filter="grounded", passed=score >= min_score, score=score, reason=reason)


# ---------------------------------------------------------------------------------------------
# Exact and near duplicates.


class DuplicateMatch(NamedTuple):
    """An earlier item that a text duplicates; `similarity` is the estimated Jaccard (1.0 when exact)."""

    key: str
    similarity: float
    exact: bool


class NearDuplicateIndex:
    """Exact duplicates by normalized-text hash, near duplicates by MinHash LSH over word shingles.

    Exact means the same lowercase words in the same order: punctuation and spacing do not count. A
    near duplicate is an indexed item whose estimated Jaccard similarity of word `shingle`-grams is at
    least `threshold`: LSH finds candidates (banded for at most 0.95, the most datasketch can band at
    128 permutations) and each candidate is checked against `threshold`. Texts shorter than `shingle`
    words use single words. Deterministic for a fixed `seed`. Memory: about 1 KiB per indexed text.
    Every method takes a text or its `Signature`: callers that both query and index a text, or index
    many, compute signatures once (in bulk: `signatures`). The pairs among many texts at once (splits,
    export) are `sketches.duplicate_pairs`'s, over the same values and bands."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3, seed: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        # here, not at the top: datasketch imports scipy (1 s), which only the run's duplicate filter needs
        from datasketch import MinHashLSH
        self._lsh = MinHashLSH(threshold=min(threshold, 0.95), num_perm=num_perm)
        self._exact: dict[str, str] = {}
        self._hashes: dict[str, Sketch] = {}
        self._order: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._order)

    def signatures(self, texts: Iterable[str]) -> list[Signature]:
        """Each text's signature, hashed in bulk (the same values as one `MinHash` per text), a batch of
        texts at a time so that only one batch's words are held."""
        texts, out = list(texts), []
        for lo in range(0, len(texts), BATCH_TEXTS):
            tokens = [words(t) for t in texts[lo : lo + BATCH_TEXTS]]
            values = iter(minhash_values([t for t in tokens if t], self.num_perm, self.seed, self.shingle))
            out += [Signature(words_digest(t), Sketch(next(values)) if t else None) for t in tokens]
        return out

    def signature(self, text: str | Signature) -> Signature:
        return text if isinstance(text, Signature) else self.signatures([text])[0]

    def matches(self, text: str | Signature) -> list[DuplicateMatch]:
        """Indexed items that `text` duplicates: exact ones first, then the most similar, then the earliest.
        A text without words can only be an exact duplicate (of another text without words)."""
        sig = self.signature(text)
        found: dict[str, DuplicateMatch] = {}
        exact = self._exact.get(sig.digest)
        if exact is not None:
            found[exact] = DuplicateMatch(exact, 1.0, True)
        if sig.minhash is not None and self._hashes:
            for key in self._lsh.query(sig.minhash):
                if key in found:
                    continue
                similarity = sig.minhash.jaccard(self._hashes[key])
                if similarity >= self.threshold:
                    found[key] = DuplicateMatch(key, similarity, False)
        return sorted(found.values(), key=lambda m: (not m.exact, -m.similarity, self._order[m.key]))

    def insert(self, key: str, text: str | Signature) -> None:
        """Index `text` under `key` whether or not it duplicates something (used to build clusters)."""
        if key in self._order:
            raise ValueError(f"key {key!r} is already indexed")
        sig = self.signature(text)
        self._order[key] = len(self._order)
        self._exact.setdefault(sig.digest, key)
        if sig.minhash is not None:
            self._hashes[key] = sig.minhash
            self._lsh.insert(key, sig.minhash)

    def add(self, key: str, text: str | Signature) -> str | None:
        """The key of the earlier item `text` duplicates (then it is not indexed), or None (then it is)."""
        sig = self.signature(text)
        found = self.matches(sig)
        if found:
            return found[0].key
        self.insert(key, sig)
        return None

    def check(self, key: str, text: str | Signature) -> Verdict:
        """`add` as a verdict; score = estimated Jaccard with the earlier item (None when unique)."""
        sig = self.signature(text)
        found = self.matches(sig)
        if not found:
            self.insert(key, sig)
            return Verdict(filter="duplicate", passed=True, reason="no earlier duplicate")
        match = found[0]
        if match.exact:
            return Verdict(filter="duplicate", passed=False, score=1.0, reason=f"exact duplicate of item {match.key}")
        return Verdict(
            filter="duplicate",
            passed=False,
            score=match.similarity,
            reason=f"near-duplicate of item {match.key} (estimated Jaccard {match.similarity:.2f})",
        )
