"""Dataset files out: chat/instruction formats, leak-free deterministic splits, and a dataset card.

Splits keep lineage groups and near-duplicate clusters whole, so no source chunk and no
near-duplicate pair is seen in both train and test.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .errors import ApplianceError, with_article
from .data.card import card_lines, cross_split_duplicates, prompts_used
from .data.filters import NearDuplicateIndex
from .store.database import Store, utcnow

FORMATS = ("openai", "sharegpt", "alpaca", "jsonl")


class ExportError(ApplianceError):
    """An export that cannot be done as asked: unknown format, bad split spec, unwritable file."""


class Example(BaseModel):
    id: str
    instruction: str
    input: str = ""
    output: str
    system: str | None = None
    group: str | None = Field(
        default=None, description="lineage key (e.g. the source chunk): a group stays in one split"
    )
    label: str | None = Field(default=None, description="class label, for stratified splits and per-label counts")
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user turn: the instruction, then the input after a blank line when there is one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


# ---------------------------------------------------------------------------------------------
# Formats.


def to_record(example: Example, fmt: str) -> dict[str, Any]:
    """One line of the dataset file in `fmt` (one of FORMATS); `jsonl` keeps every field of the example."""
    if fmt == "openai":
        system = [{"role": "system", "content": example.system}] if example.system is not None else []
        return {
            "messages": [
                *system,
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.output},
            ]
        }
    if fmt == "sharegpt":
        system = [{"from": "system", "value": example.system}] if example.system is not None else []
        return {
            "conversations": [
                *system,
                {"from": "human", "value": example.prompt},
                {"from": "gpt", "value": example.output},
            ]
        }
    if fmt == "alpaca":
        record = {"instruction": example.instruction, "input": example.input, "output": example.output}
        return record | ({"system": example.system} if example.system is not None else {})
    check_format(fmt)
    return example.model_dump()


def write_jsonl(path: str | Path, examples: Iterable[Example], fmt: str) -> int:
    """Write one JSON record per line (UTF-8, to a temporary file renamed at the end); returns the count."""
    check_format(fmt)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(to_record(example, fmt), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------------
# Splits.


def parse_split_spec(spec: str) -> dict[str, float]:
    """`"train=0.9,test=0.1"` -> `{"train": 0.9, "test": 0.1}`; names are identifiers, ratios sum to 1."""
    ratios: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ExportError(f"split {part.strip()!r} is not NAME=RATIO (e.g. train=0.9,test=0.1)")
        if not name.isidentifier():
            raise ExportError(f"split name {name!r} is not an identifier (letters, digits, underscores)")
        if name in ratios:
            raise ExportError(f"split {name!r} is named twice")
        try:
            ratios[name] = float(value)
        except ValueError:
            raise ExportError(f"split {name}: ratio {value!r} is not a number") from None
    _check_ratios(ratios)
    return ratios


def _check_ratios(ratios: dict[str, float]) -> None:
    if not ratios:
        raise ExportError("no splits given")
    for name, ratio in ratios.items():
        if not 0 < ratio <= 1:
            raise ExportError(f"split {name}: ratio must be above 0 and at most 1, got {ratio:g}")
    total = sum(ratios.values())
    if abs(total - 1) > 1e-6:
        raise ExportError(f"split ratios add up to {round(total, 6):g}, not 1")


def dedup_text(example: Example) -> str:
    """The text compared for near duplicates: input + output when there is an input, else instruction + output.

    Task data often shares one long instruction across every example; comparing it would make all
    examples with the same output look alike.
    """
    return f"{example.input if example.input.strip() else example.instruction}\n{example.output}"


def _clusters(examples: list[Example], threshold: float) -> list[list[Example]]:
    """Examples joined by shared group or near-duplicate text (union-find), each cluster in id order."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[max(find(i), find(j))] = min(find(i), find(j))

    first_of_group: dict[str, int] = {}
    index = NearDuplicateIndex(threshold=threshold)
    position = {ex.id: i for i, ex in enumerate(examples)}
    for i, ex in enumerate(examples):
        if ex.group is not None:
            union(i, first_of_group.setdefault(ex.group, i))
        text = dedup_text(ex)
        for match in index.matches(text):
            union(i, position[match.key])
        index.insert(ex.id, text)
    members: dict[int, list[Example]] = defaultdict(list)
    for i, ex in enumerate(examples):
        members[find(i)].append(ex)
    return [members[root] for root in sorted(members)]


def split_examples(
    examples: Iterable[Example],
    ratios: dict[str, float],
    seed: int = 0,
    near_dup_threshold: float = 0.8,
    stratify: bool = True,
) -> dict[str, list[Example]]:
    """Split examples by `ratios`, deterministically for a seed and whatever the input order.

    Clusters (a lineage group, plus near duplicates by MinHash LSH at `near_dup_threshold`) never
    cross splits. Clusters are shuffled with `random.Random(seed)` and each goes to the split furthest
    below its target count. With `stratify` and labels present this runs label by label (a cluster
    counts under its most common label), with targets carried over so that both each label and the
    whole come within about one cluster of the ratios. Each split gets at least one cluster when there
    are as many clusters as splits. Each split's examples come out in a seeded random order.
    """
    _check_ratios(ratios)
    ordered = sorted(examples, key=lambda ex: ex.id)
    ids = Counter(ex.id for ex in ordered)
    if ordered and ids.most_common(1)[0][1] > 1:
        raise ExportError(f"example id {ids.most_common(1)[0][0]!r} appears more than once")
    rng = random.Random(seed)
    clusters = _clusters(ordered, near_dup_threshold)
    strata: dict[str, list[list[Example]]] = defaultdict(list)
    use_labels = stratify and any(ex.label is not None for ex in ordered)
    for cluster in clusters:
        strata[_main_label(cluster) if use_labels else ""].append(cluster)

    assigned: dict[str, list[list[Example]]] = {name: [] for name in ratios}
    counts = dict.fromkeys(ratios, 0)
    seen = 0
    for key in sorted(strata):
        stratum = strata[key]
        rng.shuffle(stratum)
        seen += sum(len(c) for c in stratum)
        for cluster in stratum:
            name = max(ratios, key=lambda s: (round(ratios[s] * seen - counts[s], 9), -counts[s]))
            assigned[name].append(cluster)
            counts[name] += len(cluster)
    _fill_empty(assigned)
    result = {}
    for name, parts in assigned.items():
        split = sorted((ex for cluster in parts for ex in cluster), key=lambda ex: ex.id)
        rng.shuffle(split)
        result[name] = split
    return result


def _main_label(cluster: list[Example]) -> str:
    """The cluster's most common label (ties: the first in sort order); unlabelled sorts as ''."""
    tally = Counter(ex.label or "" for ex in cluster)
    return min(tally, key=lambda label: (-tally[label], label))


def _fill_empty(assigned: dict[str, list[list[Example]]]) -> None:
    """Give each empty split the smallest cluster of the split holding the most clusters, while one has two."""
    for parts in assigned.values():
        if parts:
            continue
        donor = max(assigned.values(), key=len)
        if len(donor) < 2:
            return
        smallest = min(range(len(donor)), key=lambda i: (len(donor[i]), -i))
        parts.append(donor.pop(smallest))


# ---------------------------------------------------------------------------------------------
# Dataset card.


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


def dataset_card(
    name: str,
    splits: dict[str, list[Example]],
    drops: dict[str, int],
    fmt: str,
    extra: dict[str, Any] | None = None,
    *,
    fidelity: dict[str, tuple[int, int]] | None = None,
    provenance: list[str] | None = None,
    prompts: list[dict[str, Any]] | None = None,
) -> str:
    """A Markdown card: counts per split, label and group; word-length statistics; drops per filter (each
    dropped example under the first filter it failed); the fidelity rate per checked axis; three examples
    as plain text; provenance lines; the prompt texts in an appendix. `extra` adds lines such as the run."""
    everything = [ex for split in splits.values() for ex in split]
    total = len(everything)
    lines = [f"# {name}", "", f"- format: `{fmt}`", f"- examples: {total}"]
    lines += [f"- {key}: {value}" for key, value in (extra or {}).items()]
    lines += ["", "## Splits", "", "| split | examples | share | groups |", "| --- | ---: | ---: | ---: |"]
    for split_name, split in splits.items():
        share = f"{len(split) / total:.1%}" if total else "-"
        groups = len({("group", ex.group) if ex.group is not None else ("example", ex.id) for ex in split})
        lines.append(f"| {split_name} | {len(split)} | {share} | {groups} |")

    labels = sorted({ex.label for ex in everything if ex.label is not None})
    if labels:
        lines += ["", "## Labels", "", f"| label | {' | '.join(splits)} | total |"]
        lines.append("| --- |" + " ---: |" * (len(splits) + 1))
        for label in labels:
            per_split = [sum(ex.label == label for ex in split) for split in splits.values()]
            lines.append(f"| {label} | {' | '.join(map(str, per_split))} | {sum(per_split)} |")

    lines += [
        "",
        "## Lengths (words)",
        "",
        "| field | min | median | mean | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines.append(_length_row("instruction", [len(ex.instruction.split()) for ex in everything]))
    if any(ex.input for ex in everything):
        lines.append(_length_row("input", [len(ex.input.split()) for ex in everything]))
    lines.append(_length_row("output", [len(ex.output.split()) for ex in everything]))

    lines += ["", "## Dropped by filters", ""]
    if any(drops.values()):
        lines += ["| filter | dropped |", "| --- | ---: |"]
        lines += [f"| {f} | {n} |" for f, n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])) if n]
    else:
        lines.append("Nothing was dropped.")
    lines.append("")
    lines.append("Each dropped example is counted once, under the first filter it failed.")

    if fidelity:
        lines += ["", "## Fidelity", "", "Each output re-labelled by the model under a grammar over the axis's values; "
                  "outputs labelled otherwise than asked were dropped.", "",
                  "| axis | labelled as asked | checked | rate |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {axis} | {hit} | {n} | {hit / n:.1%} |" if n else f"| {axis} | 0 | 0 | - |" for axis, (hit, n) in fidelity.items()]

    if provenance:
        lines += ["", "## Provenance", "", *provenance]

    lines += ["", "## Examples", ""]
    shown = [(split_name, ex) for split_name, split in splits.items() for ex in split][:3]
    for number, (split_name, ex) in enumerate(shown, start=1):
        label = f", label {ex.label}" if ex.label is not None else ""
        lines += [f"### Example {number} ({split_name}, id {ex.id}{label})", ""]
        if ex.system is not None:
            lines += _text_block("System", ex.system)
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


# ---------------------------------------------------------------------------------------------
# A run's examples out.


@dataclass
class ExportResult:
    files: dict[str, tuple[Path, int]]  # split -> (file, rows)
    card: Path
    dropped: dict[str, int]


def _spec(ratios: dict[str, float]) -> str:
    return ",".join(f"{name}={ratio:g}" for name, ratio in ratios.items())


def stored_splits(store: Store, run_id: int) -> dict[str, float] | None:
    """The split ratios a run stored its examples under (task runs; `eval` scores the stored test split),
    else None."""
    names = [r["split"] for r in store.rows(
        "SELECT DISTINCT split FROM examples WHERE run_id = ? AND kept = 1 AND split IS NOT NULL ORDER BY split", [run_id])]
    if not names:
        return None
    run = store.rows("SELECT config_json FROM runs WHERE id = ?", [run_id])[0]
    spec = (json.loads(run["config_json"] or "{}").get("spec") or {}).get("split")
    ratios = parse_split_spec(spec) if spec else {}
    return {**ratios, **{name: 0.0 for name in names if name not in ratios}}


def export_run(store: Store, run_id: int, fmt: str, out: Path, split: str | None = None, seed: int = 0,
               resplit: bool = False) -> ExportResult:
    """Write the run's kept examples in `fmt`, one file per split (`NAME.train.jsonl`, ...), and a
    dataset card beside them (`NAME.card.md`).

    A run that stored splits (a task run) is exported as stored, so no example `eval` tests on lands in
    a training file; a different `split` is refused unless `resplit`, which the card records."""
    from .recipes.run import summarize

    check_format(fmt)
    ratios = parse_split_spec(split) if split else None
    if resplit and not ratios:
        raise ExportError("--resplit needs --split NAME=RATIO,... to say how to split again")
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: folder {out.parent} does not exist")
    summary = summarize(store, run_id)
    if summary.kind in ("generate", "eval"):
        raise ExportError(f"run {run_id} is {with_article(summary.kind)} run with no dataset examples; export recipe and task runs "
                          f"(`appliance logs --run {run_id} --json` lists its outputs)")
    stored = stored_splits(store, run_id)
    if stored and ratios and not resplit and (set(ratios) != set(stored) or any(abs(ratios[n] - stored[n]) > 1e-9 for n in ratios)):
        raise ExportError(f"run {run_id} stored its splits ({_spec(stored)}; `eval` tests on them): export without --split "
                          f"to keep them, or add --resplit to split again (the card records it)")
    rows = store.rows(
        "SELECT e.*, g.seed, g.item_index FROM examples e JOIN generations g ON g.id = e.generation_id "
        "WHERE e.run_id = ? AND e.kept = 1 ORDER BY g.item_index",
        [run_id],
    )
    if not rows:
        why = summary.why_nothing() or "the run has no examples yet (run its recipe first)"
        raise ExportError(f"run {run_id} has nothing to export: {why}")
    examples = [
        Example(id=str(r["id"]), instruction=r["instruction"], input=r["input"], output=r["output"], system=r["system"],
                group=r["group_key"], label=r["label"], meta={"run_id": run_id, "generation_id": r["generation_id"],
                                                               "chunk_id": r["chunk_id"], "seed": r["seed"]})
        for r in rows
    ]
    how: str
    if stored and not resplit:
        split_of = {str(r["id"]): r["split"] for r in rows}
        splits = {name: [ex for ex in examples if split_of[ex.id] == name] for name in stored}
        how = f"as stored by run {run_id} ({_spec(stored)}), the splits `eval` uses"
    elif ratios:
        splits = split_examples(examples, ratios, seed=seed)
        how = f"made at export: {_spec(ratios)}, seed {seed}"
        if stored:
            how += (f"; RE-SPLIT with --resplit, ignoring the run's stored splits ({_spec(stored)}): "
                    f"`eval --dataset {run_id}` scores the stored test split, which these files may train on")
    else:
        splits = {"all": examples}
        how = "none (one file)"
    files: dict[str, tuple[Path, int]] = {}
    for name, part in splits.items():
        path = out if list(splits) == ["all"] else out.with_name(f"{out.stem}.{name}{out.suffix or '.jsonl'}")
        files[name] = (path, write_jsonl(path, part, fmt))
    run = store.rows("SELECT r.name, r.kind, m.name AS model FROM runs r LEFT JOIN models m ON m.id = r.model_id WHERE r.id = ?", [run_id])[0]
    crossing, total = cross_split_duplicates(splits) if len(splits) > 1 else (0, 0)
    provenance = card_lines(store, run_id) + [
        f"- splits: {how}",
        "- near-duplicates across splits: " + (f"{crossing} of {total} examples ({crossing / total:.1%}) have a near-duplicate "
                                               "(MinHash Jaccard >= 0.8) in another split" if total else "n/a (one split)"),
        f"- exported {utcnow()}",
    ]
    extra: dict[str, Any] = {"run": run_id, "kind": run["kind"], "model": run["model"],
                             "generated": summary.generated, "kept": summary.kept}
    if summary.retried:
        extra["empty outputs generated again with a new seed"] = summary.retried
    card = out.with_name(f"{out.stem}.card.md")
    card.write_text(dataset_card(run["name"] or f"run {run_id}", splits, summary.dropped, fmt, extra,
                                 fidelity=summary.fidelity, provenance=provenance,
                                 prompts=prompts_used(store, run_id)), encoding="utf-8")
    return ExportResult(files, card, summary.dropped)
