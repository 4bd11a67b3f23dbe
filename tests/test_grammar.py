"""Output constraints (appliance.engine.grammar): compiling JSON schemas, Lark, choices and GBNF into llguidance
grammars, one-line errors for bad ones, and the per-sequence Constraint against the demo model's real
vocabulary (checking one token, forced tokens, the logits mask, end only where the output is complete)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.engine.llama import Vocab
from appliance.engine.grammar import Constrainer, Grammar, GrammarError, as_grammar, _no_extra_properties

TICKET = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["account", "billing", "bug"]},
        "urgency": {"type": "string", "enum": ["low", "high"]},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["category", "urgency", "summary"],
}


@pytest.fixture(scope="module")
def constrainer(demo_model):
    with Vocab(demo_model) as vocab:
        c = Constrainer(vocab.vocab)
        yield c, vocab


def test_json_schema_compiles_to_a_fast_grammar() -> None:
    g = Grammar.from_json_schema(TICKET)
    assert g.kind == "llguidance"
    assert Grammar.from_json_schema(TICKET, prefix=" ").kind == "llguidance"
    assert as_grammar(g) is g and as_grammar(None) is None and as_grammar("  ") is None
    # Keywords llguidance does not implement are not enforced (llama.cpp's converter ignored them too).
    assert Grammar.from_json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}).kind == "llguidance"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Grammar.from_json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}), "invalid JSON schema: Invalid type: nonsense"),
        (lambda: Grammar.from_json_schema({"type": "string", "pattern": "(("}), "invalid JSON schema: regex parse error"),
        (lambda: Grammar.from_json_schema([1]), "must be an object"),  # type: ignore[arg-type]
        (lambda: Grammar.from_lark("start: foo"), 'invalid grammar: at 1(8): unknown name: "foo"'),
        (lambda: as_grammar("root ::= ("), "llama.cpp cannot parse the GBNF grammar"),
        (lambda: as_grammar(42), "must be a Grammar or GBNF text"),  # type: ignore[arg-type]
        (lambda: Grammar.choice([]), "at least one option"),
    ],
)
def test_bad_grammars_are_one_line_errors(make, message) -> None:
    with pytest.raises(GrammarError) as err:
        make()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_gbnf_is_converted_and_what_llguidance_cannot_take_keeps_llama_cpp_sampler() -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    assert as_grammar('root ::= " " ("lights_on" | "lights_off")\n').kind == "llguidance"
    # llama-cpp-python writes maxLength 80 as 80 nested optionals: too deep for llguidance's Lark parser.
    assert as_grammar(json_schema_to_gbnf(json.dumps(TICKET))).kind == "gbnf"


def test_objects_get_no_extra_properties_unless_the_schema_says() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}, "c": {"type": "array", "items": {"properties": {}}}},
        "$defs": {"d": {"properties": {"x": {}}, "additionalProperties": True}},
        "allOf": [{"properties": {"a": {}}}],
    }
    out = _no_extra_properties(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in out["allOf"][0]
    assert "additionalProperties" not in schema  # the caller's schema is not changed
    ordered = _no_extra_properties({"properties": {"a": {}, "b": {}, "c": {}}, "required": ["c", "a"]})
    assert list(ordered["properties"]) == ["a", "c", "b"]  # required first, each in schema order (llama.cpp's order)


def test_constraint_checks_tokens_forces_and_masks(constrainer) -> None:
    c_maker, vocab = constrainer
    g = Grammar.from_json_schema(TICKET, prefix=" ")
    c = c_maker.constraint(g)
    eos = 1
    assert not c.allows(eos, True)  # nothing written yet: the output is not complete
    assert not c.allows(_tokens(vocab, "hello")[0], False)
    for tok in _tokens(vocab, " {"):
        assert c.allows(tok, False)
        c.consume(tok)
    forced = c.forced()
    assert forced, "the first key is the only continuation of ' {'"
    text = b"".join(vocab_piece(vocab, t) for t in forced).decode()
    assert text.startswith('"category": "')
    for t in forced:
        c.consume(t)
    logits = np.zeros(c.n_vocab, dtype=np.float32)
    allowed = c.mask_logits(logits)
    assert 0 < allowed < 100 and int(np.isfinite(logits).sum()) == allowed
    for t in np.flatnonzero(np.isfinite(logits))[:20]:
        assert c.allows(int(t), False)
    rest = 'bug", "urgency": "low", "summary": "x"}'
    for t in _tokens(vocab, rest):
        c.consume(t)
    assert c.stopped and c.allows(eos, True)
    other = c_maker.constraint(g)  # a fresh copy for another sequence: not affected by this one's tokens
    assert not other.stopped and not other.allows(eos, True)


def test_choice_grammar_forces_the_rest_of_a_single_option(constrainer) -> None:
    c_maker, vocab = constrainer
    c = c_maker.constraint(Grammar.choice(["thermostat_set_temperature"], prefix=" "))
    forced = c.forced()
    assert b"".join(vocab_piece(vocab, t) for t in forced) == b" thermostat_set_temperature"
    for t in forced:
        c.consume(t)
    assert c.stopped


def _tokens(vocab: Vocab, text: str) -> list[int]:
    import llama_cpp

    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab.vocab, data, len(data), buf, len(data) + 8, False, False)
    return list(buf[:n])


def vocab_piece(vocab: Vocab, token: int) -> bytes:
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab.vocab, token, buf, 64, 0, False)
    return buf.raw[:n]
