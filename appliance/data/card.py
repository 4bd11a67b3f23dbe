"""The dataset card: a Markdown page beside the exported files with counts per split and label, lengths,
drops per filter, fidelity, three examples as text, and where the data came from (software versions, the
model, prompt and recipe behind the run; the prompt texts in an appendix)."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..store import Store
from .examples import Example, ExampleColumns


def card_lines(store: Store, run_id: int) -> list[str]:
    """The card's provenance section: model, prompt and recipe hashes, sampling, versions, dates."""
    run = store.rows(
        "SELECT r.*, m.name AS model_name, m.sha256 AS model_file_sha256, p.name AS prompt_name, p.sha256 AS prompt_hash "
        "FROM runs r LEFT JOIN models m ON m.id = r.model_id LEFT JOIN prompts p ON p.id = r.prompt_id WHERE r.id = ?", [run_id])[0]
    params = json.loads(run["params_json"] or "{}")
    config = json.loads(run["config_json"] or "{}")
    source = config.get("recipe_path") or config.get("spec_path")
    lines = [
        f"- model: {run['model_name'] or '-'} (file `{run.get('model_file') or '-'}`, sha256 `{run['model_sha256'] or run['model_file_sha256'] or '-'}`)",
        f"- quantization: {run.get('model_quant') or '-'}; parameters: {run.get('model_params') or '-'}",
        f"- {'task spec' if run['kind'] == 'task' else 'recipe'}: `{source or '-'}`, sha256 `{run['recipe_sha256'] or '-'}`",
        f"- prompt: {run['prompt_name'] or ('built from the task spec' if run['kind'] == 'task' else '-')}"
        + (f", sha256 `{run['prompt_hash']}`" if run["prompt_hash"] else ""),
        f"- sampling: {_sampling(params)}",
        f"- appliance {run.get('appliance_version') or '-'}, llama-cpp-python {run.get('llama_cpp_version') or '-'}",
        f"- run {run_id} started {run['started_at']}, ended {run['ended_at'] or '-'}",
    ]
    return lines


def _sampling(params: dict[str, Any]) -> str:
    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    parts = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(flat.items())]
    parts += [f"{k}: " + ", ".join(f"{kk}={json.dumps(vv, ensure_ascii=False)}" for kk, vv in sorted(v.items())) for k, v in sorted(nested.items())]
    return "; ".join(parts) or "-"


def prompts_used(store: Store, run_id: int) -> list[dict[str, Any]]:
    """The prompt files behind a run's generations (its own prompt first), for the card's appendix."""
    return store.rows(
        "SELECT p.name, p.sha256, p.source_path, p.text FROM prompts p WHERE p.id IN ("
        "SELECT prompt_id FROM runs WHERE id = ? UNION SELECT DISTINCT prompt_id FROM generations WHERE run_id = ?) "
        "ORDER BY p.id = (SELECT prompt_id FROM runs WHERE id = ?) DESC, p.id", [run_id, run_id, run_id])


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _text_block(title: str, text: str, limit: int = 1500) -> list[str]:
    if len(text) > limit:
        text = text[:limit].rstrip() + f"\n[... {len(text) - limit} more characters]"
    fence = _fence(text)
    return [f"**{title}**", "", f"{fence}text", text, fence, ""]


def _length_row(field: str, values: list[int]) -> str:
    if not values:
        return f"| {field} | - | - | - | - |"
    return (
        f"| {field} | {min(values)} | {statistics.median(values):g} | {statistics.fmean(values):.1f} | {max(values)} |"
    )


def _word_counts(texts: list[str], shared: bool) -> list[int]:
    """Each text's number of words; with `shared` (instructions and inputs, often one text for many examples)
    a text seen before is counted once. Outputs are rarely shared: hashing each would cost more than it saves."""
    if not shared:
        return [len(t.split()) for t in texts]
    counted: dict[str, int] = {}
    return [counted[t] if t in counted else counted.setdefault(t, len(t.split())) for t in texts]


def _label_lines(splits: dict[str, ExampleColumns], labels: list[str]) -> list[str]:
    """The card's label table: every label asked for (0 when none was kept, and said so), then any other label seen."""
    tallies = [Counter(split.label) for split in splits.values()]
    present = {label for tally in tallies for label in tally if label is not None}
    label_rows = [*labels, *sorted(present - set(labels))]
    lines: list[str] = []
    if label_rows:
        lines += ["", "## Labels", "", f"| label | {' | '.join(splits)} | total |"]
        lines.append("| --- |" + " ---: |" * (len(splits) + 1))
        for label in label_rows:
            per_split = [tally[label] for tally in tallies]
            lines.append(f"| {label} | {' | '.join(map(str, per_split))} | {sum(per_split)} |")
        missing = [label for label in label_rows if label not in present]
        if missing:
            lines += ["", f"No example kept for {', '.join(missing)}: the spec asks for {'it' if len(missing) == 1 else 'them'}, "
                      "but every candidate was dropped (see Dropped by filters)."]
    return lines


def _turn_lines(messages: Iterable[list[dict[str, str]] | None]) -> list[str]:
    """The card's turns table for conversations: how many examples have each number of turns (user/assistant exchanges)."""
    counts: dict[int, int] = {}
    for turns in messages:
        if turns:
            counts[len(turns) // 2] = counts.get(len(turns) // 2, 0) + 1
    if not counts:
        return []
    total = sum(k * n for k, n in counts.items())
    return ["", "## Turns", "", "| turns | conversations |", "| ---: | ---: |", *(f"| {k} | {n} |" for k, n in sorted(counts.items())),
            "", f"{total} turn{'s' if total != 1 else ''} (a user message and its answer) in {sum(counts.values())} "
            f"conversation{'s' if sum(counts.values()) != 1 else ''}."]


def dataset_card(
    name: str,
    splits: Mapping[str, ExampleColumns | Sequence[Example]],
    drops: dict[str, int],
    fmt: str,
    extra: dict[str, Any] | None = None,
    *,
    fidelity: dict[str, tuple[int, int]] | None = None,
    provenance: list[str] | None = None,
    prompts: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    judge: Any = None,
) -> str:
    """A Markdown card: counts per split, label and group; word-length statistics; drops per filter (each
    dropped example under the first filter it failed); the fidelity rate per checked axis; three examples
    as plain text; provenance lines; the prompt texts in an appendix. `extra` adds lines such as the run;
    `labels` lists every label asked for, so one with no example shows as 0. `splits`: each split's examples,
    as columns (what `export` has) or as examples."""
    splits = {name: split if isinstance(split, ExampleColumns) else ExampleColumns.of(split) for name, split in splits.items()}
    total = sum(map(len, splits.values()))
    lines = [f"# {name}", "", f"- format: `{fmt}`", f"- examples: {total}"]
    lines += [f"- {key}: {value}" for key, value in (extra or {}).items()]
    lines += ["", "## Splits", "", "| split | examples | share | groups |", "| --- | ---: | ---: | ---: |"]
    for split_name, split in splits.items():
        share = f"{len(split) / total:.1%}" if total else "-"
        groups = len({("group", group) if group is not None else ("example", id_) for group, id_ in zip(split.group, split.id)})
        lines.append(f"| {split_name} | {len(split)} | {share} | {groups} |")

    lines += _label_lines(splits, labels or [])
    lines += [
        "",
        "## Lengths (words)",
        "",
        "| field | min | median | mean | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for field in ("instruction", "input", "output"):
        texts = [text for split in splits.values() for text in getattr(split, field)]
        if field != "input" or any(texts):
            lines.append(_length_row(field, _word_counts(texts, shared=field != "output")))

    lines += ["", "## Dropped by filters", ""]
    if any(drops.values()):
        lines += ["| filter | dropped |", "| --- | ---: |"]
        lines += [f"| {f} | {n} |" for f, n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])) if n]
    else:
        lines.append("Nothing was dropped.")
    lines.append("")
    lines.append("Each dropped example is counted once, under the first filter it failed.")

    lines += _turn_lines(turns for split in splits.values() for turns in split.messages)
    if fidelity:
        lines += ["", "## Fidelity", "", "Each output re-labelled by the model under a grammar over the axis's values; "
                  "outputs labelled otherwise than asked were dropped.", "",
                  "| axis | labelled as asked | checked | rate |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {axis} | {hit} | {n} | {hit / n:.1%} |" if n else f"| {axis} | 0 | 0 | - |" for axis, (hit, n) in fidelity.items()]

    if judge:
        lines += _judge_lines(judge)

    if provenance:
        lines += ["", "## Provenance", "", *provenance]

    lines += ["", "## Examples", ""]
    shown = list(itertools.islice(((split_name, split.example(i)) for split_name, split in splits.items() for i in range(len(split))), 3))
    for number, (split_name, ex) in enumerate(shown, start=1):
        label = f", label {ex.label}" if ex.label is not None else ""
        lines += [f"### Example {number} ({split_name}, id {ex.id}{label})", ""]
        if ex.system is not None:
            lines += _text_block("System", ex.system)
        if ex.messages:  # a conversation: every turn
            for k, m in enumerate(ex.messages):
                lines += _text_block(f"{m['role'].capitalize()}, turn {k // 2 + 1}", m["content"])
            continue
        lines += _text_block("Instruction", ex.instruction)
        if ex.input:
            lines += _text_block("Input", ex.input)
        lines += _text_block("Output", ex.output)
    if not shown:
        lines.append("No examples.")
    if prompts:
        lines += ["", "## Appendix: prompts", ""]
        for p in prompts:
            lines += _text_block(f"{p['name']} (sha256 {p['sha256']})", p["text"], limit=20000)
    return "\n".join(lines).rstrip() + "\n"


def _judge_lines(judge: Any) -> list[str]:
    """The rubric judge's score distribution (`appliance.runs.summary.JudgeStats`): outputs per score, per criterion."""
    scores = sorted({score for counts in judge.counts.values() for score in counts})
    lines = ["", "## Judge scores", "",
             f"A model scored {judge.scored} outputs on each criterion under a grammar; {judge.passed} reached a mean of "
             f"{judge.threshold:g} (an example below it is dropped; a preference pair needs its chosen response to reach it).", "",
             "| criterion | " + " | ".join(str(s) for s in scores) + " | mean |",
             "| --- | " + " | ".join("---:" for _ in scores) + " | ---: |"]
    for name, counts in judge.counts.items():
        lines.append(f"| {name} | " + " | ".join(str(counts.get(s, 0)) for s in scores) + f" | {judge.mean(name):.2f} |")
    return lines
