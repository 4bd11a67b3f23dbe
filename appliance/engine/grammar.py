"""Output constraints at library speed: grammars compiled by llguidance, one matcher per sequence.

Grammar-constrained sampling used to apply the grammar to all 262k candidates of every sequence at
every step. llguidance (the Rust constraint engine llama.cpp itself can build in) answers "is this one
token allowed?" in under a microsecond and computes a whole-vocabulary mask in ~30-70 us, so the
engine samples first, checks only the sampled token, and masks the logits only when it is rejected
(llama.cpp's own order, the same distribution). Where the grammar allows exactly one continuation,
`Constraint.forced()` returns its tokens and the engine appends them without sampling (jump-forward).

A `Grammar` is what callers hand the engine: a compiled llguidance grammar (from a JSON schema, Lark,
a list of choices, or GBNF converted to Lark), or, for GBNF that llguidance cannot take, llama.cpp's
own grammar sampler (slow: it applies the grammar to every candidate).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ApplianceError, first_line

Separators = tuple[str, str]
COMPACT: Separators = (", ", ": ")  # json.dumps's default: one-line JSON, as the prompts show it


class GrammarError(ApplianceError):
    """A grammar or JSON schema that cannot be compiled into an output constraint."""


@dataclass(frozen=True)
class Grammar:
    """A compiled output constraint. kind "llguidance": `text` is an llguidance grammar (checked when
    made); kind "gbnf": `text` is GBNF for llama.cpp's own grammar sampler (the slow path)."""

    kind: Literal["llguidance", "gbnf"]
    text: str

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any], *, prefix: str = "", separators: Separators | None = COMPACT) -> Grammar:
        """Output that is one JSON value under `schema`, after the literal `prefix`.

        separators (item, key) fix the whitespace (default: json.dumps's one-line ", " and ": ");
        None allows any JSON whitespace. Objects that list properties and say nothing about
        additionalProperties get none (as llama.cpp's converter did): a small model invents keys.
        Properties are written required first, then optional, each in schema order (as llama.cpp's).
        Keywords llguidance does not implement (uniqueItems, contains, propertyNames) are not enforced,
        as llama.cpp's converter ignored them: outputs still parse, a schema check may still fail."""
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        schema = _no_extra_properties(schema)
        options: dict[str, Any] = {"lenient": True}  # keywords llguidance lacks (uniqueItems, contains...) are not enforced
        if separators is not None:
            options |= {"whitespace_flexible": False, "item_separator": separators[0], "key_separator": separators[1]}
        import llguidance

        try:
            if prefix:
                guidance = {**(schema.get("x-guidance") or {}), **options}
                body = json.dumps({**schema, "x-guidance": guidance})
                text = llguidance.LLMatcher.grammar_from_lark(f"start: {_lark_literal(prefix)} %json {body}")
            else:
                text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except (ValueError, TypeError) as exc:  # not JSON (a TOML date?), or not an object
            raise GrammarError(f"invalid JSON schema: {first_line(exc)}") from None
        return cls._checked(text, "JSON schema")

    @classmethod
    def from_lark(cls, lark: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (start rule `start`)."""
        import llguidance

        return cls._checked(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")

    @classmethod
    def choice(cls, options: list[str], *, prefix: str = "") -> Grammar:
        """Output that is exactly one of `options`, after the literal `prefix`."""
        if not options:
            raise GrammarError("a choice grammar needs at least one option")
        alternatives = " | ".join(_lark_literal(o) for o in options)
        return cls.from_lark(f"start: {_lark_literal(prefix) + ' ' if prefix else ''}({alternatives})")

    @classmethod
    def from_gbnf(cls, gbnf: str) -> Grammar:
        """llama.cpp's GBNF (root rule `root`), converted to Lark for llguidance; GBNF llguidance cannot
        take (e.g. deeply nested repetitions) keeps llama.cpp's own grammar sampler."""
        import llguidance

        try:
            lark = llguidance.gbnf_to_lark.any_to_lark(gbnf)
        except Exception:  # the converter's parser raises several kinds; llama.cpp's parser has the final word
            return cls.llama_gbnf(gbnf)
        text = llguidance.LLMatcher.grammar_from_lark(lark)
        if llguidance.LLMatcher.validate_grammar(text):
            return cls.llama_gbnf(gbnf)
        return cls("llguidance", text)

    @classmethod
    def llama_gbnf(cls, gbnf: str) -> Grammar:
        """GBNF kept for llama.cpp's own grammar sampler (every candidate, every step: slow)."""
        if not gbnf_parses(gbnf):
            raise GrammarError("llama.cpp cannot parse the GBNF grammar (see `APPLIANCE_DEBUG=1` for its log)")
        return cls("gbnf", gbnf)

    @classmethod
    def _checked(cls, text: str, what: str) -> Grammar:
        import llguidance

        problem = llguidance.LLMatcher.validate_grammar(text)
        if problem:
            raise GrammarError(f"invalid {what}: {first_line(problem)}")
        return cls("llguidance", text)


def as_grammar(value: Grammar | str | None) -> Grammar | None:
    """What Request.grammar / Engine(grammar=...) accept: a Grammar, GBNF text, or None."""
    if value is None or isinstance(value, Grammar):
        return value
    if isinstance(value, str):
        return Grammar.from_gbnf(value) if value.strip() else None
    raise GrammarError(f"a grammar must be a Grammar or GBNF text, not {type(value).__name__}")


def gbnf_parses(gbnf: str) -> bool:
    """Whether llama.cpp's own GBNF parser accepts a grammar (no model needed)."""
    import llama_cpp

    from .llama import install_log_capture

    install_log_capture()
    with _quiet_stderr():  # llama.cpp's grammar parser writes its complaint straight to stderr
        sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    if os.environ.get("APPLIANCE_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Constraint:
    """One sequence's grammar state (an llguidance matcher) and the operations the engine needs."""

    __slots__ = ("matcher", "n_vocab", "_mask")

    def __init__(self, matcher: Any, n_vocab: int, mask: Any) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self._mask = mask  # int32 buffer shared by the Constrainer (one mask is computed at a time)

    def allows(self, token: int, eog: bool) -> bool:
        """Whether the grammar takes `token` now, without consuming it. End-of-generation tokens are
        allowed only where the output is complete."""
        if eog:
            return self.matcher.is_accepting()
        return self.matcher.validate_tokens([token]) == 1

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the output grammar rejected token {token}: {first_line(self.matcher.get_error())}")

    def forced(self) -> list[int]:
        """Tokens the grammar allows as the only continuation (jump-forward), not yet consumed."""
        return list(self.matcher.compute_ff_tokens())

    @property
    def stopped(self) -> bool:
        """The output is complete and nothing more may follow."""
        return self.matcher.is_stopped()

    def mask_logits(self, logits: Any) -> int:
        """Set every disallowed token's logit to -inf (in place, e.g. in llama.cpp's logits row);
        returns how many tokens stay allowed."""
        import numpy as np

        mask = self._mask
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"the output grammar failed: {first_line(self.matcher.get_error())}")
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)
        np.putmask(logits, ~allowed, -np.inf)
        return int(np.count_nonzero(allowed))


class Constrainer:
    """Per loaded model: the llguidance tokenizer (built once, on the first constrained request: ~2 s
    for a 262k vocabulary) and a compiled template matcher per grammar, copied for each sequence."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self.tokenizer: Any = None
        self.init_seconds = 0.0
        self._templates: dict[str, Any] = {}
        self._mask: Any = None
        self.n_vocab = 0

    def constraint(self, grammar: Grammar) -> Constraint:
        if grammar.kind != "llguidance":
            raise ValueError("only llguidance grammars make a Constraint")
        if self.tokenizer is None:
            self._build_tokenizer()
        template = self._templates.get(grammar.text)
        if template is None:
            import llguidance

            template = llguidance.LLMatcher(self.tokenizer, grammar.text, log_level=0)
            if template.is_error():
                raise GrammarError(f"invalid output grammar: {first_line(template.get_error())}")
            self._templates[grammar.text] = template
        return Constraint(template.deep_copy(), self.n_vocab, self._mask)

    def _build_tokenizer(self) -> None:
        import numpy as np

        start = time.perf_counter()
        self.tokenizer, self.n_vocab = _lltokenizer(self.vocab)
        self._mask = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self.init_seconds += time.perf_counter() - start


def _lltokenizer(vocab: Any) -> tuple[Any, int]:
    """llguidance's tokenizer for a llama.cpp vocab: `llguidance.llamacpp.lltokenizer_from_vocab`, but
    through llama_vocab_get_attr (its deprecated llama_token_get_attr warns once per token, 262k times)."""
    import ctypes

    import llama_cpp
    from llguidance import LLTokenizer

    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    buffer = ctypes.create_string_buffer(16 * 1024 + 1)
    to_piece, get_attr = llama_cpp.llama_token_to_piece, llama_cpp.llama_vocab_get_attr
    control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    tokens: list[bytes] = []
    for token in range(n_vocab):
        n = to_piece(vocab, token, buffer, 16 * 1024, 0, True)
        if n < 0:
            raise GrammarError(f"token {token} of the model's vocabulary is longer than 16 KiB")
        piece = buffer.raw[:n]
        attr = get_attr(vocab, token)
        if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece  # llguidance's mark for a special token
        tokens.append(piece)
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    tokenizer = LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=llama_cpp.llama_vocab_eos(vocab), slices=None
    )
    return tokenizer, n_vocab


def _lark_literal(text: str) -> str:
    """A Lark string literal (JSON's escapes are a subset Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def required_first(properties: Iterable[str], required: Iterable[str]) -> list[str]:
    """An object's property names with the required ones first, each group in schema order: the order
    llama.cpp's JSON-schema converter writes them, which constrained outputs and the task prompts' examples
    follow."""
    names, needed = list(properties), set(required)
    return [k for k in names if k in needed] + [k for k in names if k not in needed]


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "unevaluatedItems")


def _no_extra_properties(schema: Any) -> Any:
    """A copy of `schema` where each object schema that lists properties and says nothing about
    additionalProperties gets `"additionalProperties": false` (allOf branches are left alone: each
    branch lists only some of the properties), and lists its required properties first. llguidance
    writes properties in schema order; llama.cpp's converter wrote required ones first, and the task
    prompts show outputs in that order (`required_first`)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    if isinstance(out.get("properties"), dict) and isinstance(out.get("required"), list):
        props = out["properties"]
        out["properties"] = {k: props[k] for k in required_first(props, out["required"])}
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _no_extra_properties(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_no_extra_properties(v) for v in out[key]]
    for key in _SUBSCHEMA_ONE:
        if key in out:
            out[key] = _no_extra_properties(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _no_extra_properties(out["additionalProperties"])
    return out
