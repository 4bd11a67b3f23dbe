"""Evaluation metrics: a student's predictions on held-out examples, scored by pure functions.

Every rate over nothing is 0.0: a precision of a label never predicted, a recall of a label with no
support, an F1 whose precision and recall are both 0, the accuracy of no predictions.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .filters import json_validator, words

INVALID = "(invalid)"
"""The confusion-matrix column of predictions that are missing or not one of the labels."""


def _rate(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


# ---------------------------------------------------------------------------------------------
# Classify.


def classification_report(pairs: list[tuple[str, str | None]], labels: list[str]) -> dict[str, Any]:
    """Score (expected label, predicted label or None) pairs.

    Returns `count`, `correct`, `accuracy`, `invalid` (predictions not among `labels`, which all count as
    wrong), `macro_f1` (the mean F1 over the labels present in the expected labels or predicted: a label
    with neither a test example nor a prediction says nothing about the student and is left out),
    `macro_f1_labels` (those labels), `labels` (per label: precision, recall, f1, support, predicted)
    and `confusion` (`{expected: {predicted: n}}`, columns `labels` then INVALID).
    """
    if len(set(labels)) != len(labels) or INVALID in labels:
        raise ValueError(f"labels must be distinct and not {INVALID!r}")
    confusion = {label: dict.fromkeys([*labels, INVALID], 0) for label in labels}
    for expected, predicted in pairs:
        if expected not in confusion:
            raise ValueError(f"expected label {expected!r} is not one of the labels")
        confusion[expected][predicted if predicted in confusion else INVALID] += 1
    per_label: dict[str, dict[str, Any]] = {}
    for label in labels:
        hits = confusion[label][label]
        predicted = sum(confusion[e][label] for e in labels)
        support = sum(confusion[label].values())
        precision, recall = _rate(hits, predicted), _rate(hits, support)
        per_label[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _rate(2 * precision * recall, precision + recall),
            "support": support,
            "predicted": predicted,
        }
    correct = sum(confusion[label][label] for label in labels)
    scored = [label for label, m in per_label.items() if m["support"] or m["predicted"]]
    return {
        "count": len(pairs),
        "correct": correct,
        "accuracy": _rate(correct, len(pairs)),
        "invalid": sum(row[INVALID] for row in confusion.values()),
        "macro_f1": _rate(sum(per_label[label]["f1"] for label in scored), len(scored)),
        "macro_f1_labels": scored,
        "labels": per_label,
        "confusion": confusion,
    }


# ---------------------------------------------------------------------------------------------
# Extract.

_NOT_JSON = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same_value(expected: Any, predicted: Any) -> bool:
    """Numbers compare numerically (21 == 21.0), strings after strip, objects and arrays item by item,
    anything else (booleans, null) by type and value."""
    if _is_number(expected) and _is_number(predicted):
        return expected == predicted
    if isinstance(expected, str) and isinstance(predicted, str):
        return expected.strip() == predicted.strip()
    if isinstance(expected, dict) and isinstance(predicted, dict):
        return expected.keys() == predicted.keys() and all(same_value(v, predicted[k]) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(predicted, list):
        return len(expected) == len(predicted) and all(map(same_value, expected, predicted))
    return type(expected) is type(predicted) and expected == predicted


def extraction_report(pairs: list[tuple[dict[str, Any], str]], schema: dict[str, Any]) -> dict[str, Any]:
    """Score (expected object, predicted raw text) pairs.

    Returns `count`, `valid` and `json_valid` (the prediction parses as JSON and validates against the
    schema), `exact` and `exact_match` (the parsed prediction equals the expected object, by
    `same_value`), and `fields` (per field of the schema's properties, then other expected keys:
    `correct` and `exact_match`). A field is correct when the prediction is a JSON object that has it
    with the expected value, or lacks it and so does the expected object.
    """
    validator = json_validator(schema)
    fields = list(schema.get("properties", {}))
    fields += list(dict.fromkeys(k for expected, _ in pairs for k in expected if k not in fields))
    valid = exact = 0
    correct = dict.fromkeys(fields, 0)
    for expected, raw in pairs:
        try:
            value = json.loads(raw.strip())
        except json.JSONDecodeError:
            value = _NOT_JSON
        valid += value is not _NOT_JSON and validator.is_valid(value)
        if not isinstance(value, dict):
            continue
        exact += same_value(expected, value)
        for field in fields:
            if field in expected and field in value:
                correct[field] += same_value(expected[field], value[field])
            else:
                correct[field] += field not in expected and field not in value
    n = len(pairs)
    return {
        "count": n,
        "valid": valid,
        "json_valid": _rate(valid, n),
        "exact": exact,
        "exact_match": _rate(exact, n),
        "fields": {f: {"correct": c, "exact_match": _rate(c, n)} for f, c in correct.items()},
    }


# ---------------------------------------------------------------------------------------------
# Transform.


def token_f1(expected: str, predicted: str) -> float:
    """SQuAD-style F1 of the lowercase word tokens (`\\w+`); two texts without words score 1.0."""
    gold, pred = words(expected), words(predicted)
    if not gold or not pred:
        return float(gold == pred)
    common = sum((Counter(gold) & Counter(pred)).values())
    precision, recall = _rate(common, len(pred)), _rate(common, len(gold))
    return _rate(2 * precision * recall, precision + recall)


def transform_report(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Score (expected text, predicted text) pairs: `count`, `exact` and `exact_match` (equal after
    strip), `token_f1` (the mean of `token_f1`)."""
    exact = sum(expected.strip() == predicted.strip() for expected, predicted in pairs)
    return {
        "count": len(pairs),
        "exact": exact,
        "exact_match": _rate(exact, len(pairs)),
        "token_f1": _rate(sum(token_f1(e, p) for e, p in pairs), len(pairs)),
    }


# ---------------------------------------------------------------------------------------------
# Text.


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(line(cells) for cells in [header, *rows])


def _of(part: int, whole: int) -> str:
    return f"{_rate(part, whole):.3f} ({part}/{whole})"


def format_report(report: dict[str, Any], kind: str) -> str:
    """A report of `kind` (classify, extract, transform) as plain-text tables for a terminal."""
    n = report["count"]
    if kind == "classify":
        labels = list(report["labels"])
        per_label = [
            [label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"])]
            for label, m in report["labels"].items()
        ]
        confusion = [[label, *(str(v) for v in report["confusion"][label].values())] for label in labels]
        return "\n\n".join(
            [
                f"accuracy {_of(report['correct'], n)}, macro F1 {report['macro_f1']:.3f} "
                f"(over the {len(report.get('macro_f1_labels', labels))} labels present or predicted), invalid {report['invalid']}",
                _table(["label", "precision", "recall", "f1", "support"], per_label),
                "confusion (rows: expected, columns: predicted)\n"
                + _table(["", *labels, INVALID], confusion),
            ]
        )
    if kind == "extract":
        fields = [[field, _of(m["correct"], n)] for field, m in report["fields"].items()]
        return (
            f"JSON valid {_of(report['valid'], n)}, exact match {_of(report['exact'], n)}\n\n"
            + _table(["field", "exact match"], fields)
        )
    if kind == "transform":
        return f"exact match {_of(report['exact'], n)}, token F1 {report['token_f1']:.3f}"
    raise ValueError(f"unknown task kind {kind!r}")
