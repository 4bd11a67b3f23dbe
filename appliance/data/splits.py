"""Splits: leak-free and deterministic. Lineage groups and near-duplicate clusters stay whole, so no source
chunk and no near-duplicate pair is seen in both train and test."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from operator import attrgetter

import numpy as np

from .examples import Example, ExportError
from .sketches import ExampleSketches


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


def _clusters(examples: list[Example], threshold: float, sketches: ExampleSketches | None = None) -> list[list[Example]]:
    """Examples joined by shared group or near-duplicate text (union-find over the few joined pairs; an
    example joined to none is a cluster of its own), each cluster in id order, clusters in order of their
    first example. `sketches`: the examples' sketches when known (by id), else computed."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[max(find(i), find(j))] = min(find(i), find(j))

    first_of_group: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.group is not None and (first := first_of_group.setdefault(ex.group, i)) != i:
            union(i, first)
    known, rows = _sketched(examples, sketches)
    position = np.full(len(known), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    left, right = (position[side] for side in known.near_pairs(threshold))
    present = (left >= 0) & (right >= 0)
    for i, j in zip(left[present].tolist(), right[present].tolist()):
        union(i, j)
    wordless = np.flatnonzero(~known.sketches.has_words[rows]).tolist()  # exact duplicates of each other
    for i in wordless[1:]:
        union(wordless[0], i)
    members: dict[int, list[Example]] = defaultdict(list)
    for i, ex in enumerate(examples):
        members[find(i) if parent[i] != i else i].append(ex)
    return [members[root] for root in sorted(members)]


def split_examples(
    examples: Iterable[Example],
    ratios: dict[str, float],
    seed: int = 0,
    near_dup_threshold: float = 0.8,
    stratify: bool = True,
    sketches: ExampleSketches | None = None,
) -> dict[str, list[Example]]:
    """Split examples by `ratios`, deterministically for a seed and whatever the input order.

    Clusters (a lineage group, plus near duplicates by MinHash LSH at `near_dup_threshold`) never
    cross splits. Clusters are shuffled with `random.Random(seed)` and each goes to the split furthest
    below its target count. With `stratify` and labels present this runs label by label (a cluster
    counts under its most common label), with targets carried over so that both each label and the
    whole come within about one cluster of the ratios. Each split gets at least one cluster when there
    are as many clusters as splits. Each split's examples come out in a seeded random order.
    `sketches`: the examples' MinHash sketches when known (stored ones, read by `export`); else computed.
    """
    _check_ratios(ratios)
    ordered = sorted(examples, key=attrgetter("id"))
    if len({ex.id for ex in ordered}) != len(ordered):
        ids = Counter(ex.id for ex in ordered)
        raise ExportError(f"example id {ids.most_common(1)[0][0]!r} appears more than once")
    rng = random.Random(seed)
    clusters = _clusters(ordered, near_dup_threshold, sketches)
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
        seen += sum(map(len, stratum))
        _assign(stratum, [(name, ratio * seen) for name, ratio in ratios.items()], assigned, counts)
    _fill_empty(assigned)
    result = {}
    for name, parts in assigned.items():
        split = sorted((ex for cluster in parts for ex in cluster), key=attrgetter("id"))
        rng.shuffle(split)
        result[name] = split
    return result


def _assign(clusters: list[list[Example]], targets: list[tuple[str, float]], assigned: dict[str, list[list[Example]]],
            counts: dict[str, int]) -> None:
    """Each cluster in turn to the split furthest below its target count (rounded to 9 decimals; ties: the
    split with fewer examples, then the first named): `max` by (gap, -count), without a call per split."""
    names, goal = [name for name, _ in targets], [target for _, target in targets]
    have = [counts[name] for name in names]
    for cluster in clusters:
        best, best_gap, best_have = 0, round(goal[0] - have[0], 9), have[0]
        for k in range(1, len(names)):
            gap = round(goal[k] - have[k], 9)
            if gap > best_gap or (gap == best_gap and have[k] < best_have):
                best, best_gap, best_have = k, gap, have[k]
        assigned[names[best]].append(cluster)
        have[best] += len(cluster)
    counts.update(zip(names, have))


def _main_label(cluster: list[Example]) -> str:
    """The cluster's most common label (ties: the first in sort order); unlabelled sorts as ''."""
    if len(cluster) == 1:
        return cluster[0].label or ""
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


def cross_split_duplicates(splits: dict[str, list[Example]], threshold: float = 0.8,
                           sketches: ExampleSketches | None = None) -> tuple[int, int]:
    """(examples with a near duplicate in another split, examples): measured on the text splits are
    de-duplicated on, MinHash Jaccard at `threshold` (`sketches`: the examples' sketches when known, by id).
    Texts without words are exact duplicates of each other: each one after the first (in split order)
    counts when it is in another split than the first."""
    keyed = [ex for part in splits.values() for ex in part]
    split_of = np.repeat(np.arange(len(splits)), [len(part) for part in splits.values()])
    known, rows = _sketched(keyed, sketches)
    split_of_row = np.full(len(known), -1, dtype=np.int64)
    split_of_row[rows] = split_of
    left, right = known.near_pairs(threshold)
    a, b = split_of_row[left], split_of_row[right]
    crossing = (a >= 0) & (b >= 0) & (a != b)
    count = len(np.unique(np.concatenate([left[crossing], right[crossing]])))
    wordless = np.flatnonzero(~known.sketches.has_words[rows])
    if len(wordless):
        count += int(np.count_nonzero(split_of[wordless[1:]] != split_of[wordless[0]]))
    return count, len(keyed)


def _sketched(examples: list[Example], known: ExampleSketches | None) -> tuple[ExampleSketches, np.ndarray]:
    """The examples' sketches and each one's row in them: `known`'s rows by id, or computed in order."""
    if known is not None:
        return known, known.rows(examples)
    return ExampleSketches(examples), np.arange(len(examples))
