"""Task prompts: what the teacher and the student are asked, how outputs are constrained and parsed.

Prompts are completions (the teacher and the student are base models; no chat template). The task
prompt is the same for the teacher writing labels and for the student being evaluated:

    {system}
    Style: {style}                        (transform only)

    Input: {example input}                (classify: each label's first example; else every example)
    Output: {example output}

    Input: {input}
    Output:

It ends with "Output:" and no space: tokenizers attach the space to the word after it, so the model
writes " lights_on" as usual. The output grammars therefore start with one space, and outputs are
stripped (`parse_output`). Inputs are one line; the prompts collapse any whitespace in them to single
spaces. The labels' descriptions are not listed in it: on the demo model a list of them made the
labels worse (10 of 18 hand-written requests right with it, 14 without); they guide the writing of
inputs instead (`render_input_prompt`).
"""

from __future__ import annotations

import json
import random
from typing import Any

from ..prompts.files import PromptFile
from ..data.filters import json_validator
from ..engine.grammar import Grammar, required_first
from .grammars import classify_gbnf, extract_gbnf
from .kinds import ClassifyTask, ExtractTask, Label, Task, TransformTask, flat, title

INPUT_STOP = ["\n"]
"""Stop strings for the input-writing prompt: an input is one line."""


# ---------------------------------------------------------------------------------------------
# Outputs: format, grammar, parsing.


def output_schema(task: Task) -> dict[str, Any] | None:
    """The JSON schema of one parsed output: classify `{"type": "string", "enum": labels}`, extract the
    task's schema, transform None (free text)."""
    if isinstance(task, ClassifyTask):
        return {"type": "string", "enum": task.label_names}
    if isinstance(task, ExtractTask):
        return task.json_schema
    return None


def _ordered(value: Any, schema: Any) -> Any:
    """`value` with object keys in the order the llama.cpp grammar writes them: required properties,
    then optional ones, each in schema order (then keys the schema does not name)."""
    if isinstance(value, dict) and isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
        props: dict[str, Any] = schema["properties"]
        order = required_first(props, schema.get("required", []))
        keys = [k for k in order if k in value] + [k for k in value if k not in props]
        return {k: _ordered(value[k], props.get(k)) for k in keys}
    if isinstance(value, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        return [_ordered(v, schema["items"]) for v in value]
    return value


def format_output(task: Task, value: Any) -> str:
    """An output as the prompts show it and the dataset stores it; extract: one-line JSON, keys in grammar order."""
    if isinstance(task, ExtractTask):
        return json.dumps(_ordered(value, task.json_schema), ensure_ascii=False)
    return str(value).strip()


def parse_output(task: Task, text: str) -> str | None:
    """A generated output as the dataset stores it (`format_output`), or None when it is not valid:
    classify, not one of the labels; extract, not JSON or not under the schema; transform, empty."""
    text = text.strip()
    if isinstance(task, ClassifyTask):
        return text if text in task.label_names else None
    if isinstance(task, ExtractTask):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return format_output(task, value) if json_validator(task.json_schema).is_valid(value) else None
    return text or None


def output_grammar(task: Task, chat: bool = False) -> str | None:
    """GBNF that constrains an output (`appliance.tasks.grammars`); None for transform."""
    if isinstance(task, ClassifyTask):
        return classify_gbnf(task.label_names, chat)
    if isinstance(task, ExtractTask):
        return extract_gbnf(task.json_schema, chat)
    return None


def output_constraint(task: Task, chat: bool = False) -> Any:
    """The engine's constraint for an output (llguidance: checked per sampled token, forced tokens appended),
    the same language as `output_grammar`; None for transform."""
    lead = "" if chat else " "
    if isinstance(task, ClassifyTask):
        return Grammar.choice(task.label_names, prefix=lead)
    if isinstance(task, ExtractTask):
        return Grammar.from_json_schema(task.json_schema, prefix=lead)
    return None


def stop_strings(task: Task) -> list[str]:
    """Stop strings for the task prompt: classify and extract outputs are one line (their grammar ends
    them anyway); a transform output ends at a blank line or the next "Input:"."""
    return ["\n\n", "\nInput:"] if isinstance(task, TransformTask) else ["\n"]


# ---------------------------------------------------------------------------------------------
# Prompts.


def _shots(task: Task) -> list[tuple[str, str]]:
    if isinstance(task, ClassifyTask):
        return [(label.examples[0], label.name) for label in task.labels]
    if isinstance(task, ExtractTask):
        return [(e.input, format_output(task, e.output)) for e in task.examples]
    return [(e.input, e.output.strip()) for e in task.examples]


def render_task_prompt(task: Task, input_text: str) -> str:
    """The few-shot completion prompt that asks for one output; ends with "Output:" (no space)."""
    head = [task.system.strip()]
    if isinstance(task, TransformTask):
        head.append(f"Style: {task.style}")
    blocks = ["\n".join(head)]
    blocks += [f"Input: {flat(i)}\nOutput: {o}" for i, o in _shots(task)]
    blocks.append(f"Input: {flat(input_text)}\nOutput:")
    return "\n\n".join(blocks)


def task_messages(task: Task, input_text: str) -> list[dict[str, str]]:
    """The same request as `render_task_prompt` for a chat model: the task's instruction as the system
    message, each few-shot example as a user/assistant exchange, the input as the last user turn."""
    system = task.system.strip() + (f"\nStyle: {task.style}" if isinstance(task, TransformTask) else "")
    messages = [{"role": "system", "content": system}]
    for i, o in _shots(task):
        messages += [{"role": "user", "content": flat(i)}, {"role": "assistant", "content": o}]
    messages.append({"role": "user", "content": flat(input_text)})
    return messages


def render_input_prompt(
    task: Task,
    *,
    label: str | None = None,
    axes_values: dict[str, str] | None = None,
    edge_case: str | None = None,
    hard_negative: str | None = None,
    seed: int = 0,
    prompt: PromptFile | None = None,
    chat: bool = False,
) -> str | list[dict[str, str]]:
    """The few-shot completion prompt (with `chat`, the chat messages) that makes the teacher write one input (end it at INPUT_STOP and
    read it with `parse_input`).

    Classify needs `label`, the label to write an input for; `hard_negative` names a label it is easily
    confused with. The few-shot shows one example of each other label, then all the hard negative's
    examples, then the label's own, closest to the new input; `seed` picks and orders them (a task run
    draws it from a few per round, `tasks.SHOT_ORDERS`, so prompts share their few-shot block in the KV cache). The axes'
    values (without their names) and the edge case follow the label line, or stand on a "- " line for
    tasks without labels. On the demo model, naming the hard negative or writing "Tone: casual" lines made
    the teacher copy them into the input, so the built-in prompt does neither. `prompt` (from
    `LoadedTaskSpec.input_prompts`) replaces the built-in prompt; it gets the axes and INPUT_PROMPT_VARIABLES.
    """
    values = dict(axes_values or {})
    if set(values) - set(task.axes):
        raise ValueError(f"task {task.name!r} has no axis {sorted(set(values) - set(task.axes))[0]!r}")
    target, other, shots = _input_shots(task, label, hard_negative, random.Random(seed))
    if prompt is not None:
        render = prompt.render_messages if chat else prompt.render_completion
        return render(
            {
                **values,
                "label": target.name if target else "",
                "description": target.description if target else "",
                "examples": list(target.examples) if target else task.example_inputs(),
                "shots": [
                    {"label": lb.name if lb else "", "description": lb.description if lb else "", "text": e}
                    for lb, e in shots
                ],
                "edge_case": edge_case or "",
                "hard_negative": other.name if other else "",
                "hard_negative_description": other.description if other else "",
            }
        )
    notes = ", ".join([*(values[axis] for axis in task.axes if axis in values), *([edge_case] if edge_case else [])])
    return _builtin_input_prompt(task, target, shots, notes, chat)


def _input_shots(task: Task, label: str | None, hard_negative: str | None,
                 rng: random.Random) -> tuple[Label | None, Label | None, list[tuple[Label | None, str]]]:
    """The label to write for, its hard negative, and the few-shot (label, example input) pairs in order."""
    if not isinstance(task, ClassifyTask):
        if label is not None or hard_negative is not None:
            raise ValueError(f"task {task.name!r} has no labels")
        inputs = task.example_inputs()
        return None, None, [(None, e) for e in rng.sample(inputs, len(inputs))]
    if label is None:
        raise ValueError(f"task {task.name!r} is a classify task: give the label to write an input for")
    target = task.label(label)
    other = task.label(hard_negative) if hard_negative is not None else None
    rest = [(lb, rng.choice(lb.examples)) for lb in task.labels if lb not in (target, other)]
    rng.shuffle(rest)
    shots: list[tuple[Label | None, str]] = list(rest)
    for lb in [other, target] if other else [target]:
        shots += [(lb, e) for e in rng.sample(lb.examples, len(lb.examples))]
    return target, other, shots


def _builtin_input_prompt(task: Task, target: Label | None, shots: list[tuple[Label | None, str]], notes: str,
                          chat: bool) -> str | list[dict[str, str]]:
    def head(lb: Label) -> str:
        return f"{title(task.name)}: {lb.name} ({lb.description})"

    if target:
        last = [head(target) + (f" - {notes}" if notes else "")]
    else:
        last = [f"- {notes}"] if notes else []
    if chat:
        # The chat form of the same prompt: the description as the system message, each shot a request
        # (its label line) answered with the example input, then the label line of the new input.
        ask = f"Write one {task.input_name.lower()}, on one line."
        messages = [{"role": "system", "content": flat(task.input_description or task.system) + " " + ask}]
        for lb, e in shots:
            messages += [{"role": "user", "content": head(lb) if lb else ask}, {"role": "assistant", "content": flat(e)}]
        messages.append({"role": "user", "content": "\n".join(last) or ask})
        return messages
    blocks = [flat(task.input_description or task.system)]
    blocks += ["\n".join([*([head(lb)] if lb else []), f"{task.input_name}: {flat(e)}"]) for lb, e in shots]
    blocks.append("\n".join([*last, f"{task.input_name}:"]))
    return "\n\n".join(blocks)


def copied_scaffold(
    task: Task,
    text: str,
    *,
    axes_values: dict[str, str] | None = None,
    edge_case: str | None = None,
) -> str | None:
    """The piece of the built-in input-writing prompt's scaffolding that a written input copies, or None:
    the notes (two or more axis values and edge case, joined as in the prompt), the edge case, or the
    start of a label line ("lights_on ("). Small teachers do copy them; drop such inputs."""
    values = axes_values or {}
    notes = [*(values[axis] for axis in task.axes if axis in values), *([edge_case] if edge_case else [])]
    pieces = [", ".join(notes)] if len(notes) > 1 else []
    pieces += [edge_case] if edge_case else []
    if isinstance(task, ClassifyTask):
        pieces += [f"{label.name} (" for label in task.labels]
    folded = flat(text).casefold()
    return next((piece for piece in pieces if flat(piece).casefold() in folded), None)


def parse_input(text: str) -> str | None:
    """The input the teacher wrote: its first line, without surrounding quotes and extra spaces; None if empty."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    line = flat(line)
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line or None
