"""Evaluation metrics against numbers worked out by hand on small fixed sets of predictions."""

from __future__ import annotations

import pytest

from appliance.data.metrics import (
    INVALID,
    classification_report,
    extraction_report,
    format_report,
    same_value,
    token_f1,
    transform_report,
)

LABELS = ["a", "b", "c"]
# 10 predictions; the 4th is invalid (None).
PAIRS = [
    ("a", "a"), ("a", "a"), ("a", "b"), ("a", None),
    ("b", "b"), ("b", "b"), ("b", "c"),
    ("c", "c"), ("c", "a"), ("c", "c"),
]


def test_classification_by_hand():
    r = classification_report(PAIRS, LABELS)
    # confusion: a -> a 2, b 1, invalid 1; b -> b 2, c 1; c -> a 1, c 2
    assert r["confusion"] == {
        "a": {"a": 2, "b": 1, "c": 0, INVALID: 1},
        "b": {"a": 0, "b": 2, "c": 1, INVALID: 0},
        "c": {"a": 1, "b": 0, "c": 2, INVALID: 0},
    }
    assert (r["count"], r["correct"], r["invalid"]) == (10, 6, 1)
    assert r["accuracy"] == pytest.approx(0.6)
    a, b, c = (r["labels"][x] for x in LABELS)
    # a: predicted 3 times (2 right), support 4: P 2/3, R 1/2, F1 = 2*(1/3)/(7/6) = 4/7
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert (a["support"], a["predicted"]) == (4, 3)
    # b and c: predicted 3 times (2 right), support 3: P = R = F1 = 2/3
    for m in (b, c):
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
        assert (m["support"], m["predicted"]) == (3, 3)
    assert r["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 2 / 3) / 3)  # = 40/63
    assert r["macro_f1"] == pytest.approx(40 / 63)


def test_classification_zero_over_zero_is_zero():
    r = classification_report([("a", "zzz"), ("a", "a")], ["a", "d"])
    assert r["confusion"]["a"] == {"a": 1, "d": 0, INVALID: 1}  # a prediction outside the labels is invalid
    d = r["labels"]["d"]  # never expected, never predicted
    assert (d["precision"], d["recall"], d["f1"], d["support"]) == (0.0, 0.0, 0.0, 0)
    # a: P 1/1, R 1/2, F1 2/3; d is neither expected nor predicted, so macro F1 is over a alone
    assert r["macro_f1"] == pytest.approx(2 / 3) and r["macro_f1_labels"] == ["a"] and r["accuracy"] == 0.5
    empty = classification_report([], ["a", "b"])
    assert (empty["accuracy"], empty["macro_f1"], empty["count"], empty["macro_f1_labels"]) == (0.0, 0.0, 0, [])


def test_macro_f1_leaves_out_labels_never_expected_nor_predicted():
    """All 3 right with 4 more labels absent from the test split and from the predictions: macro F1 is 1, not 3/7."""
    r = classification_report([("a", "a"), ("b", "b"), ("c", "c")], ["a", "b", "c", "d", "e", "f", "g"])
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0 and r["macro_f1_labels"] == ["a", "b", "c"]
    # a label that is predicted but never expected counts: its precision is 0
    r = classification_report([("a", "a"), ("a", "e")], ["a", "b", "e"])
    assert r["macro_f1_labels"] == ["a", "e"] and r["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_rejects_unknown_expected_labels():
    with pytest.raises(ValueError, match="'x' is not one of the labels"):
        classification_report([("x", "a")], ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        classification_report([], ["a", "a"])


SCHEMA = {
    "type": "object",
    "properties": {
        "device": {"type": "string", "enum": ["light", "thermostat"]},
        "room": {"type": ["string", "null"]},
        "value": {"type": ["number", "null"]},
    },
    "required": ["device", "room", "value"],
    "additionalProperties": False,
}
EXTRACTIONS = [
    # valid, exact, all fields right
    ({"device": "light", "room": "kitchen", "value": None}, '{"device": "light", "room": "kitchen", "value": null}'),
    # valid, exact: strings compare after strip, 21 == 21.0, raw text is stripped
    ({"device": "thermostat", "room": "bedroom", "value": 21}, ' {"device": "thermostat", "room": " bedroom ", "value": 21.0}'),
    # valid, not exact: room wrong
    ({"device": "thermostat", "room": None, "value": 18}, '{"device": "thermostat", "room": "hall", "value": 18}'),
    # invalid (value missing), not exact: device and room right, value missing is wrong
    ({"device": "light", "room": "office", "value": None}, '{"device": "light", "room": "office"}'),
    # not JSON: every field wrong
    ({"device": "light", "room": None, "value": None}, "light please"),
    # JSON but invalid (enum, type): room right; device wrong; value "20" is not the number 20
    ({"device": "thermostat", "room": "kitchen", "value": 20}, '{"device": "toaster", "room": "kitchen", "value": "20"}'),
]


def test_extraction_by_hand():
    r = extraction_report(EXTRACTIONS, SCHEMA)
    assert (r["count"], r["valid"], r["exact"]) == (6, 3, 2)
    assert r["json_valid"] == pytest.approx(3 / 6) and r["exact_match"] == pytest.approx(2 / 6)
    assert {f: m["correct"] for f, m in r["fields"].items()} == {"device": 4, "room": 4, "value": 3}
    assert r["fields"]["value"]["exact_match"] == pytest.approx(3 / 6)
    assert list(r["fields"]) == ["device", "room", "value"]  # schema order


def test_extraction_optional_fields_and_non_objects():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    pairs = [({"a": 1}, '{"a": 1}'), ({"a": 1}, '{"a": 1, "b": "x"}'), ({"a": 1}, "[1]"), ({"a": 1, "z": 2}, '{"a": 1}')]
    r = extraction_report(pairs, schema)
    # b: absent in both (1st, 4th) is right, predicted but not expected (2nd) is wrong, a non-object (3rd)
    # has every field wrong; z (expected only in the 4th, not in the schema) is right where both lack it
    assert {f: m["correct"] for f, m in r["fields"].items()} == {"a": 3, "b": 2, "z": 2}
    assert (r["valid"], r["exact"]) == (3, 1)  # [1] is JSON, but not an object as the schema says
    empty = extraction_report([], schema)
    assert (empty["json_valid"], empty["exact_match"]) == (0.0, 0.0)


def test_same_value():
    assert same_value(21, 21.0) and same_value(" x ", "x") and same_value(None, None)
    assert not same_value(1, True) and not same_value("21", 21) and not same_value(0, None)
    assert same_value({"a": [1, " b"]}, {"a": [1.0, "b"]}) and not same_value({"a": 1}, {"a": 1, "b": 2})


def test_transform_by_hand():
    pairs = [
        ("Turn on the lights.", "Turn on the lights."),  # exact, F1 1
        ("the cat sat", "  the cat sat "),  # exact after strip, F1 1
        ("The cat sat on the mat", "a cat sat"),  # common {cat, sat}: P 2/3, R 2/6, F1 4/9
        ("hello", ""),  # F1 0
    ]
    assert token_f1("The cat sat on the mat", "a cat sat") == pytest.approx(4 / 9)
    r = transform_report(pairs)
    assert (r["count"], r["exact"]) == (4, 2)
    assert r["exact_match"] == 0.5
    assert r["token_f1"] == pytest.approx((1 + 1 + 4 / 9 + 0) / 4)  # = 11/18
    assert token_f1("", "") == 1.0 and token_f1("...", "") == 1.0 and token_f1("a", "b") == 0.0
    assert transform_report([])["token_f1"] == 0.0


def test_format_report_tables():
    text = format_report(classification_report(PAIRS, LABELS), "classify")
    lines = text.splitlines()
    assert lines[0] == "accuracy 0.600 (6/10), macro F1 0.635 (over the 3 labels present or predicted), invalid 1"
    assert "label  precision  recall     f1  support" in lines
    assert "a          0.667   0.500  0.571        4" in lines
    assert "confusion (rows: expected, columns: predicted)" in lines
    assert "   a  b  c  (invalid)" in lines
    assert "a  2  1  0          1" in lines
    text = format_report(extraction_report(EXTRACTIONS, SCHEMA), "extract")
    assert text.splitlines()[0] == "JSON valid 0.500 (3/6), exact match 0.333 (2/6)"
    assert text.splitlines()[2:] == ["field   exact match", "device  0.667 (4/6)", "room    0.667 (4/6)", "value   0.500 (3/6)"]
    text = format_report(transform_report([("a b", "a b"), ("a b", "a")]), "transform")
    assert text == "exact match 0.500 (1/2), token F1 0.833"
    with pytest.raises(ValueError, match="unknown task kind"):
        format_report({"count": 0}, "rank")
