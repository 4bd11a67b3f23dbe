"""Task specs: the shipped example, every bad input as one line naming the file and the key, targets,
output grammars (parsed by llama.cpp), output parsing, and the exact prompt shapes."""

from __future__ import annotations

import copy
import datetime
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.prompts.files import parse_prompt
from appliance.tasks.prompts import (
    copied_scaffold,
    format_output,
    output_grammar,
    output_schema,
    parse_input,
    parse_output,
    render_input_prompt,
    render_task_prompt,
    stop_strings,
)
from appliance.engine.grammar import gbnf_parses as grammar_parses
from appliance.tasks.kinds import INPUT_PROMPT_VARIABLES, ClassifyTask
from appliance.tasks.spec import (
    Balance,
    TaskSpec,
    TaskSpecError,
    label_targets,
    load_task_spec,
    parse_task_spec,
    task_targets,
)

REPO = Path(__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "name": "home",
    "model": "gemma-3-270m-q4_k_m",
    "count": 30,
    "seed": 1,
    "split": "train=0.8,test=0.2",
    "tasks": [
        {
            "name": "intent",
            "kind": "classify",
            "share": 0.5,
            "system": "Classify the request.",
            "input_name": "Request",
            "edge_cases": ["mentions two rooms"],
            "hard_negatives": [["on", "off"]],
            "labels": [
                {"name": "on", "description": "turn lights on", "examples": ["lights on", "make it bright"]},
                {"name": "off", "description": "turn lights off", "examples": ["lights off"]},
                {"name": "heat", "description": "change the heating", "examples": ["warmer please"]},
            ],
            "axes": {"tone": ["casual", "terse"], "noise": ["none", "typos"]},
        },
        {
            "name": "slots",
            "kind": "extract",
            "share": 0.3,
            "system": "Extract the device and room as JSON.",
            "schema": {
                "type": "object",
                "properties": {
                    "device": {"type": "string", "enum": ["light", "thermostat"]},
                    "room": {"type": ["string", "null"]},
                },
                "required": ["device", "room"],
                "additionalProperties": False,
            },
            "examples": [
                {"input": "kitchen light on", "output": {"room": "kitchen", "device": "light"}},
                {"input": "warmer please", "output": '{"device": "thermostat", "room": null}'},
            ],
        },
        {
            "name": "polite",
            "kind": "transform",
            "share": 0.2,
            "system": "Rewrite the request politely.",
            "style": "One polite sentence.",
            "examples": [{"input": "lights on", "output": "Could you turn the lights on, please?"}],
        },
    ],
}


def toml_value(value: Any) -> str:
    """A TOML inline value (one line): enough to write any spec these tests build."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def write_spec(folder: Path, data: dict[str, Any], name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items()), encoding="utf-8")
    return path


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


# ---------------------------------------------------------------------------------------------
# Good specs.


def test_shipped_example_loads_and_is_sized_for_the_demo():
    loaded = load_task_spec(REPO / "tasks" / "smart-home.toml")
    spec = loaded.spec
    assert [t.kind for t in spec.tasks] == ["classify", "extract"]
    assert 30 <= spec.count <= 60
    targets = task_targets(spec)
    assert sum(targets.values()) == spec.count
    intent = spec.task("intent")
    assert isinstance(intent, ClassifyTask) and 5 <= len(intent.labels) <= 6
    assert all(label.description and len(label.examples) >= 2 for label in intent.labels)
    assert intent.hard_negatives and intent.edge_cases
    assert sum(label_targets(intent, targets["intent"]).values()) == targets["intent"]
    for task in spec.tasks:
        assert grammar_parses(output_grammar(task) or "")
        for example_input in task.example_inputs():
            assert parse_output(task, " " + _expected_output(task, example_input)) is not None
    assert spec.split_ratios == {"train": 0.7, "validation": 0.1, "test": 0.2}
    assert len(loaded.sha256) == 64 and loaded.text.startswith("#")


def _expected_output(task, example_input: str) -> str:
    if isinstance(task, ClassifyTask):
        return next(lb.name for lb in task.labels if example_input in lb.examples)
    return next(format_output(task, e.output) for e in task.examples if e.input == example_input)


def test_base_spec_loads(tmp_path):
    spec = load_task_spec(write_spec(tmp_path, base())).spec
    assert task_targets(spec) == {"intent": 15, "slots": 9, "polite": 6}
    assert spec.self_consistency.samples == 3 and spec.balance.tolerance == 0.2
    assert spec.tasks[1].examples[1].output == {"device": "thermostat", "room": None}  # JSON text for null


# ---------------------------------------------------------------------------------------------
# Bad specs: one line, the file, the key, the problem.


def _set(*path_and_value: Any) -> Callable[[dict], None]:
    *path, value = path_and_value

    def change(data: dict) -> None:
        node = data
        for step in path[:-1]:
            node = node[step]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return change


_DELETE = object()
T0, T1, T2 = ("tasks", 0), ("tasks", 1), ("tasks", 2)


def _counts_instead(data: dict) -> None:
    del data["tasks"][1]["share"]
    data["tasks"][1]["count"] = 9


def _all_counts(data: dict) -> None:
    for task, n in zip(data["tasks"], (10, 10, 5)):
        task.pop("share", None)
        task["count"] = n
    data["count"] = 30


BAD = [
    ("duplicate task", _set(*T1, "name", "intent"), "tasks[1].name", "duplicate task name 'intent' (also tasks[0])"),
    ("bad task name", _set(*T1, "name", "my slots"), "tasks[1].name", "letters, digits"),
    ("duplicate label", _set(*T0, "labels", 2, "name", "on"), "tasks[0].labels[2].name", "duplicate label 'on' (also labels[0])"),
    ("one label", _set(*T0, "labels", [BASE["tasks"][0]["labels"][0]]), "tasks[0].labels", "at least 2 labels, got 1"),
    ("label with spaces around", _set(*T0, "labels", 1, "name", " off"), "tasks[0].labels[1].name", "surrounding spaces"),
    ("label with a line break", _set(*T0, "labels", 1, "name", "of\nf"), "tasks[0].labels[1].name", "printable"),
    ("reserved label", _set(*T0, "labels", 1, "name", "(invalid)"), "tasks[0].labels[1].name", "reserved"),
    ("label without examples", _set(*T0, "labels", 1, "examples", []), "tasks[0].labels[1].examples", "at least 1 item"),
    ("example under two labels", _set(*T0, "labels", 2, "examples", ["Lights  ON"]), "tasks[0].labels[2].examples[0]", "already an example of label 'on'"),
    ("multi-line example", _set(*T0, "labels", 2, "examples", ["a\nb"]), "tasks[0].labels[2].examples[0]", "one line"),
    ("hard negative not a label", _set(*T0, "hard_negatives", [["on", "dim"]]), "tasks[0].hard_negatives[0]", "'dim' is not a label"),
    ("hard negative with itself", _set(*T0, "hard_negatives", [["on", "on"]]), "tasks[0].hard_negatives[0]", "with itself"),
    ("hard negative twice", _set(*T0, "hard_negatives", [["on", "off"], ["off", "on"]]), "tasks[0].hard_negatives[1]", "listed twice"),
    ("hard negative of three", _set(*T0, "hard_negatives", [["on", "off", "heat"]]), "tasks[0].hard_negatives[0]", "at most 2 items"),
    ("shares off", _set(*T0, "share", 0.3), "tasks", "shares add up to 0.8, not 1"),
    ("shares and counts", _counts_instead, "tasks[1]", "gives a count while tasks[0] gives a share"),
    ("share and count", _set(*T0, "count", 4), "tasks[0].count", "not both"),
    ("no count with shares", _set("count", _DELETE), "count", "is missing"),
    ("counts off", lambda d: (_all_counts(d), d.update(count=31)), "count", "is 31 but the tasks' counts add up to 25"),
    ("too few for the labels", _set("count", 4), "count", "none of them for label"),
    ("task gets nothing", lambda d: (d.update(count=2), d["tasks"].pop(0), d["tasks"][0].update(share=0.8)), "tasks[1].share", "none of the 2"),
    ("invalid schema", _set(*T1, "schema", "properties", "device", "type", "strin"), "tasks[1].schema", "invalid JSON schema at $.properties.device.type"),
    ("schema not an object", _set(*T1, "schema", {"type": "string"}), "tasks[1].schema.type", 'must be "object"'),
    ("schema without fields", _set(*T1, "schema", {"type": "object"}), "tasks[1].schema.properties", "at least one field"),
    ("schema with a date", _set(*T1, "schema", "default", datetime.date(2024, 1, 1)), "tasks[1].schema", "not JSON"),
    ("schema llama.cpp cannot use", _set(*T1, "schema", "properties", "room", {"$ref": "other.json"}), "tasks[1].schema", "grammar"),
    ("schema llama.cpp cannot parse", _set(*T1, "schema", "properties", "dev\bice", {"type": "string"}), "tasks[1].schema", "cannot parse the grammar"),
    ("example off schema", _set(*T1, "examples", 0, "output", "device", "toaster"), "tasks[1].examples[0].output", "does not match the schema: $.device"),
    ("example missing a field", _set(*T1, "examples", 0, "output", {"device": "light"}), "tasks[1].examples[0].output", "'room' is a required property"),
    ("example output not JSON", _set(*T1, "examples", 1, "output", "{device: x"), "tasks[1].examples[1].output", "is not JSON"),
    ("extract without examples", _set(*T1, "examples", []), "tasks[1].examples", "at least 1 item"),
    ("transform blank line", _set(*T2, "examples", 0, "output", "a\n\nb"), "tasks[2].examples[0].output", "blank line"),
    ("transform without style", _set(*T2, "style", _DELETE), "tasks[2].style", "is missing"),
    ("unknown top-level key", _set("cout", 3), "cout", "unknown key"),
    ("unknown label key", _set(*T0, "labels", 0, "desc", "x"), "tasks[0].labels[0].desc", "unknown key"),
    ("key of another kind", _set(*T1, "labels", []), "tasks[1].labels", "unknown key"),
    ("unknown table key", _set("balance", {"tolerence": 0.1}), "balance.tolerence", "unknown key"),
    ("wrong type", _set("count", "many"), "count", "valid integer"),
    ("wrong nested type", _set(*T0, "labels", 0, "examples", "lights on"), "tasks[0].labels[0].examples", "valid list"),
    ("negative share", _set(*T0, "share", -0.5), "tasks[0].share", "greater than 0"),
    ("unknown kind", _set(*T0, "kind", "summarize"), "tasks[0].kind", "classify, extract, transform"),
    ("no kind", _set(*T0, "kind", _DELETE), "tasks[0].kind", "classify, extract, transform"),
    ("no tasks", _set("tasks", []), "tasks", "at least 1 item"),
    ("empty axis", _set(*T0, "axes", "tone", []), "tasks[0].axes.tone", "has no values"),
    ("blank axis value", _set(*T0, "axes", "tone", ["casual", " "]), "tasks[0].axes.tone[1]", "is empty"),
    ("reserved axis", _set(*T0, "axes", "label", ["x"]), "tasks[0].axes.label", "reserved"),
    ("axis name", _set(*T0, "axes", "speaking style", ["x"]), "tasks[0].axes.speaking style", "axis names"),
    ("split does not parse", _set("split", "train:0.9"), "split", "NAME=RATIO"),
    ("split does not add up", _set("split", "train=0.5,test=0.2"), "split", "add up to 0.7"),
    ("self-consistency", _set("self_consistency", {"samples": 0}), "self_consistency.samples", "greater than or equal to 1"),
    ("edge and hard shares", _set(*T0, "hard_negative_share", 0.9), "tasks[0].hard_negative_share", "more than 1"),
    ("input name with colon", _set(*T0, "input_name", "Request:"), "tasks[0].input_name", "':'"),
]


@pytest.mark.parametrize("change, key, problem", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path, change, key, problem):
    data = base()
    change(data)
    path = write_spec(tmp_path, data)
    with pytest.raises(TaskSpecError) as info:
        load_task_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"task spec {path}: key ")
    assert f"key '{key}': " in message
    assert problem in message


def test_bad_files(tmp_path):
    with pytest.raises(TaskSpecError, match="no such task spec file"):
        load_task_spec(tmp_path / "missing.toml")
    with pytest.raises(TaskSpecError, match="is a directory"):
        load_task_spec(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\ncount = \n')
    with pytest.raises(TaskSpecError, match=r"broken.toml: not valid TOML"):
        load_task_spec(broken)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"'.encode("latin-1"))
    with pytest.raises(TaskSpecError, match="not UTF-8"):
        load_task_spec(latin)


def test_input_prompt_files(tmp_path):
    data = base()
    data["tasks"][0]["input_prompt"] = "prompts/write.md"
    spec_path = write_spec(tmp_path, data)
    with pytest.raises(TaskSpecError, match=r"key 'tasks\[0\].input_prompt': no such prompt file: .*write.md"):
        load_task_spec(spec_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "write.md").write_text("{{ label }} {{ tone }} {{ mood }}\n")
    with pytest.raises(TaskSpecError, match=r"key 'tasks\[0\].input_prompt': the prompt uses mood, not available"):
        load_task_spec(spec_path)
    (tmp_path / "prompts" / "write.md").write_text(
        "+++\nstop = [\"\\n\"]\n+++\nSay {{ label }} ({{ description }}), {{ tone }}{% if hard_negative %}, not {{ hard_negative }}{% endif %}.\n"
        "{% for s in shots %}{{ s.label }}: {{ s.text }}\n{% endfor %}{{ label }}:"
    )
    loaded = load_task_spec(spec_path)
    prompt = loaded.input_prompts["intent"]
    task = loaded.spec.tasks[0]
    text = render_input_prompt(task, label="on", axes_values={"tone": "terse"}, hard_negative="off", seed=2, prompt=prompt)
    assert text.startswith("Say on (turn lights on), terse, not off.\nheat: warmer please\n")
    assert text.endswith("on:")
    assert loaded.resolve("prompts/write.md") == tmp_path / "prompts" / "write.md"


# ---------------------------------------------------------------------------------------------
# Targets.


@pytest.mark.parametrize(
    "shares, count, expected",
    [
        ((0.5, 0.3, 0.2), 30, (15, 9, 6)),
        ((1 / 3, 1 / 3, 1 / 3), 10, (4, 3, 3)),
        ((0.45, 0.45, 0.1), 11, (5, 5, 1)),  # quotas 4.95, 4.95, 1.1
        ((0.7, 0.2, 0.1), 7, (5, 1, 1)),  # quotas 4.9, 1.4, 0.7: the two largest remainders win
    ],
)
def test_task_targets_by_largest_remainder(shares, count, expected):
    data = base()
    data["count"] = 100  # labels need room at validation; targets are computed below
    for task, share in zip(data["tasks"], shares):
        task["share"] = share
    spec = parse_task_spec(data, "t.toml")
    spec.count = count
    assert tuple(task_targets(spec).values()) == expected
    assert sum(task_targets(spec).values()) == count


def test_task_targets_equal_and_counts():
    data = base()
    for task in data["tasks"]:
        del task["share"]
    data["count"] = 31
    assert task_targets(parse_task_spec(data, "t.toml")) == {"intent": 11, "slots": 10, "polite": 10}
    _all_counts(data)
    del data["count"]
    spec = parse_task_spec(data, "t.toml")
    assert spec.count == 25 and task_targets(spec) == {"intent": 10, "slots": 10, "polite": 5}


def test_label_targets_equal_or_weighted():
    data = base()
    task = parse_task_spec(data, "t.toml").tasks[0]
    assert label_targets(task, 15) == {"on": 5, "off": 5, "heat": 5}
    assert label_targets(task, 10) == {"on": 4, "off": 3, "heat": 3}
    data["tasks"][0]["labels"][2]["weight"] = 2
    task = parse_task_spec(data, "t.toml").tasks[0]
    assert label_targets(task, 10) == {"on": 3, "off": 2, "heat": 5}  # quotas 2.5, 2.5, 5


@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=8), st.integers(0, 5000))
def test_label_targets_always_sum(weights, n):
    labels = [{"name": f"l{i}", "description": "d", "examples": [f"e{i}"], "weight": w} for i, w in enumerate(weights)]
    labels += [{"name": "other", "description": "d", "examples": ["x"]}]
    task = ClassifyTask.model_validate({"name": "t", "kind": "classify", "system": "s", "labels": labels})
    targets = label_targets(task, n)
    assert sum(targets.values()) == n and min(targets.values()) >= 0
    whole = sum(weights) + 1
    for label in task.labels:  # largest remainder: each count within 1 of its exact quota
        assert abs(targets[label.name] - n * label.weight / whole) < 1 + 1e-9


def test_balance_bounds_round_outward():
    assert Balance(tolerance=0.2).bounds(10) == (8, 12)
    assert Balance(tolerance=0.2).bounds(3) == (2, 4)
    assert Balance(tolerance=0).bounds(3) == (3, 3)


# ---------------------------------------------------------------------------------------------
# Outputs: grammars, schema, parsing.


def test_classify_grammar_quotes_and_escapes():
    task = ClassifyTask.model_validate(
        {
            "name": "t",
            "kind": "classify",
            "system": "s",
            "labels": [
                {"name": 'say "hi"', "description": "d", "examples": ["a"]},
                {"name": "back\\slash", "description": "d", "examples": ["b"]},
                {"name": "café ☕", "description": "d", "examples": ["c"]},
            ],
        }
    )
    gbnf = output_grammar(task)
    assert gbnf == 'root ::= " " ("say \\"hi\\"" | "back\\\\slash" | "café ☕")\n'
    assert grammar_parses(gbnf)
    assert not grammar_parses('root ::= " " ("a" | b')  # llama.cpp's parser, which does reject bad grammars
    assert output_schema(task) == {"type": "string", "enum": ['say "hi"', "back\\slash", "café ☕"]}
    assert parse_output(task, ' say "hi"') == 'say "hi"' and parse_output(task, " hello") is None


def test_extract_grammar_and_outputs(tmp_path):
    spec = parse_task_spec(base(), "t.toml")
    slots, polite = spec.tasks[1], spec.tasks[2]
    gbnf = output_grammar(slots)
    assert grammar_parses(gbnf) and 'root ::= " " ("{" space device-kv' in gbnf
    assert output_grammar(polite) is None and output_schema(polite) is None
    assert output_schema(slots) == BASE["tasks"][1]["schema"]
    # keys come out in the grammar's order (required, then optional, in schema order), on one line
    assert format_output(slots, {"room": "hall", "device": "light"}) == '{"device": "light", "room": "hall"}'
    assert parse_output(slots, ' {"room": null,  "device":"light"} ') == '{"device": "light", "room": null}'
    assert parse_output(slots, '{"device": "toaster", "room": null}') is None
    assert parse_output(slots, '{"device": "light"') is None
    assert parse_output(polite, "  Please do.\n") == "Please do." and parse_output(polite, " ") is None
    assert stop_strings(slots) == ["\n"] and stop_strings(polite) == ["\n\n", "\nInput:"]


def test_copied_scaffold():
    spec = parse_task_spec(base(), "t.toml")
    intent, slots, _ = spec.tasks
    axes = {"tone": "casual", "noise": "typos"}
    assert copied_scaffold(intent, "play jazz - casual, typos", axes_values=axes) == "casual, typos"
    assert copied_scaffold(intent, "turn lights on", axes_values=axes) is None  # a description may be a fine input
    assert copied_scaffold(intent, "heat (change it)") == "heat ("
    assert copied_scaffold(slots, "a request that MENTIONS two rooms", edge_case="mentions two rooms") == "mentions two rooms"
    assert copied_scaffold(intent, "casual: turn the lights on", axes_values=axes) is None  # one value alone is fine
    assert copied_scaffold(slots, "lights on (kitchen)", axes_values=axes) is None


def test_parse_input():
    assert parse_input(" turn on  the lights\nIntent: on") == "turn on the lights"
    assert parse_input('"dim it"') == "dim it"
    assert parse_input("   \n") is None and parse_input('""') is None


# ---------------------------------------------------------------------------------------------
# Prompts: exact shapes.


def test_task_prompts_exact():
    spec = parse_task_spec(base(), "t.toml")
    intent, slots, polite = spec.tasks
    assert render_task_prompt(intent, "switch on\n the porch light") == (
        "Classify the request.\n\n"
        "Input: lights on\nOutput: on\n\n"
        "Input: lights off\nOutput: off\n\n"
        "Input: warmer please\nOutput: heat\n\n"
        "Input: switch on the porch light\nOutput:"
    )
    assert render_task_prompt(slots, "hall light") == (
        "Extract the device and room as JSON.\n\n"
        'Input: kitchen light on\nOutput: {"device": "light", "room": "kitchen"}\n\n'
        'Input: warmer please\nOutput: {"device": "thermostat", "room": null}\n\n'
        "Input: hall light\nOutput:"
    )
    assert render_task_prompt(polite, "heat up") == (
        "Rewrite the request politely.\nStyle: One polite sentence.\n\n"
        "Input: lights on\nOutput: Could you turn the lights on, please?\n\n"
        "Input: heat up\nOutput:"
    )


def test_input_prompts_exact_and_seeded():
    spec = parse_task_spec(base(), "t.toml")
    intent, slots, _ = spec.tasks
    text = render_input_prompt(
        intent, label="on", axes_values={"noise": "typos", "tone": "casual"}, edge_case="mentions two rooms",
        hard_negative="off", seed=5,
    )
    head, *shots, last = text.split("\n\n")
    assert head == "Classify the request."
    assert shots[0] == "Intent: heat (change the heating)\nRequest: warmer please"  # other labels: one example each
    assert shots[1] == "Intent: off (turn lights off)\nRequest: lights off"  # then the hard negative's
    assert sorted(shots[2:]) == [  # then the label's own, in an order the seed picks
        "Intent: on (turn lights on)\nRequest: lights on",
        "Intent: on (turn lights on)\nRequest: make it bright",
    ]
    # axis values in the task's axis order, then the edge case; the hard negative is not named
    assert last == "Intent: on (turn lights on) - casual, typos, mentions two rooms\nRequest:"
    plain = render_input_prompt(intent, label="heat", seed=1)
    assert plain.endswith("\n\nIntent: heat (change the heating)\nRequest:")
    orders = {render_input_prompt(intent, label="heat", seed=s) for s in range(20)}
    assert len(orders) > 1
    assert render_input_prompt(intent, label="heat", seed=3) == render_input_prompt(intent, label="heat", seed=3)
    assert render_input_prompt(slots, seed=0, axes_values={}) in {
        "Extract the device and room as JSON.\n\nInput: kitchen light on\n\nInput: warmer please\n\nInput:",
        "Extract the device and room as JSON.\n\nInput: warmer please\n\nInput: kitchen light on\n\nInput:",
    }
    data = base()
    data["tasks"][1].update(axes={"tone": ["terse"]}, input_description="Requests to a hub.", input_name="Request")
    slots = parse_task_spec(data, "t.toml").tasks[1]
    head, *shots, last = render_input_prompt(slots, axes_values={"tone": "terse"}, edge_case="no room", seed=1).split("\n\n")
    assert head == "Requests to a hub."
    assert sorted(shots) == ["Request: kitchen light on", "Request: warmer please"]
    assert last == "- terse, no room\nRequest:"  # tasks without labels: the notes on a line of their own
    with pytest.raises(ValueError, match="give the label"):
        render_input_prompt(intent)
    with pytest.raises(ValueError, match="no labels"):
        render_input_prompt(slots, label="on")
    with pytest.raises(ValueError, match="no axis 'mood'"):
        render_input_prompt(intent, label="on", axes_values={"mood": "x"})
    with pytest.raises(ValueError, match="no label 'dim'"):
        render_input_prompt(intent, label="dim")


def test_a_round_of_input_prompts_shares_few_shot_blocks():
    """A task run draws each input prompt's few-shot picks and order from SHOT_ORDERS per round, so the
    prompts of one label share their few-shot block (decoded once into the KV cache), and rounds differ."""
    from appliance.runs.style import PromptStyle
    from appliance.tasks.run import SHOT_ORDERS, _input_items

    loaded = load_task_spec(REPO / "tasks" / "smart-home.toml")
    style = PromptStyle(mode="completion", template=None, model_name="m")
    deficits = {("intent", "lights_on"): 20, ("slots", None): 20}

    def blocks(round_no: int) -> dict[tuple, set[str]]:
        found: dict[tuple, set[str]] = {}
        for item in _input_items(loaded, round_no, deficits, style):
            v = item.variables
            shots = item.prompt.split("\n\n")[1:-1]  # between the description and the new input's lines
            found.setdefault((v["task"], v["label"], v.get("hard_negative")), set()).add("\n\n".join(shots))
        return found

    first = blocks(0)
    assert all(1 <= len(b) <= SHOT_ORDERS for b in first.values())
    assert len(first[("slots", None, None)]) > 1  # still more than one order
    assert blocks(1)[("slots", None, None)] != first[("slots", None, None)]  # each round draws its own


def test_input_prompt_variables_match_what_render_gives():
    spec = parse_task_spec(base(), "t.toml")
    names = " ".join(f"{{{{ {v} }}}}" for v in sorted(INPUT_PROMPT_VARIABLES | {"tone", "noise"}))
    prompt = parse_prompt(names, "all")
    text = render_input_prompt(spec.tasks[0], label="on", axes_values={"tone": "a", "noise": "b"}, prompt=prompt)
    assert "on" in text and "turn lights on" in text


# ---------------------------------------------------------------------------------------------
# Property: any TOML-ish data gives a valid spec or one TaskSpecError, nothing else.

_scalar = st.one_of(
    st.text(max_size=12),
    st.integers(-3, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.dates(),
    st.sampled_from(["on", "off", "heat", "classify", "extract", "transform", "object", "string", "train=1"]),
)
_toml = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["name", "kind", "share", "count", "labels", "examples", "schema", "axes", "hard_negatives", "output",
     "input", "description", "weight", "type", "properties", "required", "split", "style", "tasks", "x"]
)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a tree of dicts and lists, the containers themselves included."""
    keys = list(node) if isinstance(node, dict) else range(len(node))
    found = [(node, None)]
    for k in keys:
        found.append((node, k))
        if isinstance(node[k], (dict, list)):
            found += _slots(node[k])
    return found


@st.composite
def mutated_specs(draw) -> dict:
    """The base spec with 1-4 random edits anywhere in its tree: a value replaced, a key deleted or added."""
    data = base()
    for _ in range(draw(st.integers(1, 4))):
        node, key = draw(st.sampled_from(_slots(data)))
        if key is None:  # add to this container
            if isinstance(node, dict):
                node[draw(_keys)] = draw(_toml)
            else:
                node.append(draw(_toml))
        elif draw(st.booleans()):
            node[key] = draw(_toml)
        else:
            del node[key]
    return data


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
_types = st.sampled_from(["string", "number", "integer", "boolean", "null", ["string", "null"]])


@st.composite
def generated_specs(draw) -> dict:
    """Specs built the right way round from random parts: random label text (quotes, backslashes, any
    script), random fields and types, random shares or counts."""
    tasks = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["classify", "extract", "transform"]))
        task: dict[str, Any] = {"name": f"t{i}", "kind": kind, "system": draw(_text)}
        if kind == "classify":
            names = draw(st.lists(_text, min_size=2, max_size=6))
            task["labels"] = [
                {"name": n, "description": draw(_text), "examples": [f"{n} {j} {k}" for k in range(draw(st.integers(1, 3)))],
                 "weight": draw(st.floats(0.1, 10))}
                for j, n in enumerate(names)
            ]
        elif kind == "extract":
            fields = draw(st.dictionaries(_text, _types, min_size=1, max_size=4))
            task["schema"] = {"type": "object", "properties": {f: {"type": t} for f, t in fields.items()}}
            task["examples"] = [{"input": draw(_text), "output": {}}]
        else:
            task["style"] = draw(_text)
            task["examples"] = [{"input": draw(_text), "output": draw(_text)}]
        tasks.append(task)
    data: dict[str, Any] = {"name": "g", "model": "m", "tasks": tasks}
    if draw(st.booleans()):
        for task in tasks:
            task["count"] = draw(st.integers(1, 50))
    else:
        weights = [draw(st.floats(0.05, 1)) for _ in tasks]
        for task, w in zip(tasks, weights):
            task["share"] = w / sum(weights)
        data["count"] = draw(st.integers(1, 300))
    return data


def _check_valid(spec: TaskSpec) -> None:
    targets = task_targets(spec)
    assert sum(targets.values()) == spec.count
    for task in spec.tasks:
        if isinstance(task, ClassifyTask):
            assert min(label_targets(task, targets[task.name]).values()) >= 1
            render_input_prompt(task, label=task.labels[-1].name, seed=1)
        else:
            render_input_prompt(task, seed=1)
        grammar = output_grammar(task)
        assert grammar is None or grammar_parses(grammar)
        render_task_prompt(task, "x")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_property_mutated_specs(data):
    try:
        spec = parse_task_spec(data, "h.toml")
    except TaskSpecError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("task spec h.toml: key '")
        return
    _check_valid(spec)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_specs())
def test_property_generated_specs(data):
    try:
        spec = parse_task_spec(data, "h.toml")
    except TaskSpecError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("task spec h.toml: key '")
        return
    _check_valid(spec)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _toml, max_size=6))
def test_property_random_dicts(data):
    try:
        spec = parse_task_spec(data, "h.toml")
    except TaskSpecError as exc:
        assert "\n" not in str(exc)
        return
    _check_valid(spec)


def test_nan_and_infinite_numbers_are_rejected():
    for value in (math.nan, math.inf):
        data = base()
        data["tasks"][0]["labels"][0]["weight"] = value
        with pytest.raises(TaskSpecError, match=r"tasks\[0\].labels\[0\].weight"):
            parse_task_spec(data, "t.toml")
