"""Splits: leak-free and deterministic. Lineage groups and near-duplicate clusters stay whole, so no source
chunk and no near-duplicate pair is seen in both train and test."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from .examples import Example, ExportError
from .sketches import ExampleSketches, Sketches


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


def _clusters(order: list[int], groups: Sequence[str | None], sketches: Sketches, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows joined by shared group or near-duplicate text (union-find over the few joined pairs; a row joined
    to none is a cluster of its own), over ranks: rank r is row `order[r]`. Returns (ranks, sizes): the ranks
    of each cluster's members, clusters in order of their first rank and each in rank order, then each
    cluster's size."""
    parent: dict[int, int] = {}  # only the joined ranks: the rest are their own roots

    def find(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        parent[max(a, b)] = min(a, b)

    first_of_group: dict[str, int] = {}
    for r, group in enumerate(map(groups.__getitem__, order)):
        if group is not None and (first := first_of_group.setdefault(group, r)) != r:
            union(r, first)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    left, right = sketches.pairs(threshold)
    for i, j in zip(rank[left].tolist(), rank[right].tolist()):
        union(i, j)
    wordless = np.flatnonzero(~sketches.has_words[order]).tolist()  # exact duplicates of each other
    for r in wordless[1:]:
        union(wordless[0], r)
    root = np.arange(len(order), dtype=np.int64)  # a cluster's root is its first member (union keeps the lower)
    if parent:
        joined = np.fromiter(parent, dtype=np.int64, count=len(parent))
        root[joined] = [find(i) for i in joined.tolist()]
    ranks = np.argsort(root, kind="stable")
    ordered_roots = root[ranks]
    starts = np.flatnonzero(np.concatenate(([True], ordered_roots[1:] != ordered_roots[:-1])))
    return ranks, np.diff(np.append(starts, len(order)))


def split_rows(
    ids: Sequence[str],
    groups: Sequence[str | None],
    labels: Sequence[str | None],
    sketches: Sketches,
    ratios: dict[str, float],
    seed: int = 0,
    near_dup_threshold: float = 0.8,
    stratify: bool = True,
) -> dict[str, list[int]]:
    """Split rows (example i has id `ids[i]`, group `groups[i]`, label `labels[i]` and sketch `sketches`
    row i) by `ratios`: each split's rows, deterministically for a seed and whatever the row order.

    Clusters (a lineage group, plus near duplicates by MinHash LSH at `near_dup_threshold`) never
    cross splits. Clusters are shuffled with `random.Random(seed)` and each goes to the split furthest
    below its target count. With `stratify` and labels present this runs label by label (a cluster
    counts under its most common label), with targets carried over so that both each label and the
    whole come within about one cluster of the ratios. Each split gets at least one cluster when there
    are as many clusters as splits. Each split's rows come out in a seeded random order.

    The work is done on ranks (positions in id order) and cluster numbers: a shuffle permutes any list of a
    length the same way, so shuffling numbers gives the order that shuffling lists of examples gave.
    """
    _check_ratios(ratios)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    if len(set(ids)) != len(ids):
        raise ExportError(f"example id {Counter(ids[i] for i in order).most_common(1)[0][0]!r} appears more than once")
    rng = random.Random(seed)
    ranks, sizes = _clusters(order, groups, sketches, near_dup_threshold)
    size_of = sizes.tolist()
    strata: dict[str, list[int]] = defaultdict(list)  # label -> the clusters (numbers, in order) under it
    if stratify and any(label is not None for label in labels):
        label_of_rank = [labels[i] or "" for i in order]
        first = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        for k, (lo, size) in enumerate(zip(first, size_of)):
            members = ranks[lo:lo + size].tolist()
            strata[label_of_rank[members[0]] if size == 1 else _main_label([label_of_rank[r] for r in members])].append(k)
    else:
        strata[""] = list(range(len(size_of)))

    assigned: dict[str, list[int]] = {name: [] for name in ratios}
    counts = dict.fromkeys(ratios, 0)
    seen = 0
    for key in sorted(strata):
        stratum = strata[key]
        rng.shuffle(stratum)
        seen += sum(size_of[k] for k in stratum)
        _assign(stratum, size_of, [(name, ratio * seen) for name, ratio in ratios.items()], assigned, counts)
    _fill_empty(assigned, size_of)
    split_of_cluster = np.empty(len(size_of), dtype=np.int64)
    for number, parts in enumerate(assigned.values()):
        split_of_cluster[parts] = number
    split_of = np.repeat(split_of_cluster, sizes)  # of each of `ranks`
    row_of_rank = np.asarray(order, dtype=np.int64)
    result = {}
    for number, name in enumerate(assigned):
        split = np.sort(ranks[split_of == number]).tolist()
        rng.shuffle(split)
        result[name] = row_of_rank[split].tolist()
    return result


def split_examples(
    examples: Iterable[Example],
    ratios: dict[str, float],
    seed: int = 0,
    near_dup_threshold: float = 0.8,
    stratify: bool = True,
    sketches: ExampleSketches | None = None,
) -> dict[str, list[Example]]:
    """`split_rows` over examples: each split's examples. `sketches`: the examples' MinHash sketches when
    known (by id; a task run's, stored with its examples), else computed."""
    rows = list(examples)
    known = sketches.sketches.take(sketches.rows(rows)) if sketches is not None else ExampleSketches(rows).sketches
    parts = split_rows([ex.id for ex in rows], [ex.group for ex in rows], [ex.label for ex in rows], known, ratios,
                       seed=seed, near_dup_threshold=near_dup_threshold, stratify=stratify)
    return {name: [rows[i] for i in part] for name, part in parts.items()}


def _assign(clusters: list[int], size_of: list[int], targets: list[tuple[str, float]], assigned: dict[str, list[int]],
            counts: dict[str, int]) -> None:
    """Each cluster in turn to the split furthest below its target count (rounded to 9 decimals; ties: the
    split with fewer examples, then the first named): `max` by (gap, -count), without a call per split; only
    the gap of the split that took a cluster changes."""
    names, goal = [name for name, _ in targets], [target for _, target in targets]
    have = [counts[name] for name in names]
    gaps = [round(g - h, 9) for g, h in zip(goal, have)]
    chosen: list[list[int]] = [assigned[name] for name in names]
    splits = range(1, len(names))
    for cluster in clusters:
        best, best_gap, best_have = 0, gaps[0], have[0]
        for k in splits:
            gap = gaps[k]
            if gap > best_gap or (gap == best_gap and have[k] < best_have):
                best, best_gap, best_have = k, gap, have[k]
        chosen[best].append(cluster)
        have[best] += size_of[cluster]
        gaps[best] = round(goal[best] - have[best], 9)
    counts.update(zip(names, have))


def _main_label(labels: list[str]) -> str:
    """A cluster's most common label (ties: the first in sort order); unlabelled is ''."""
    tally = Counter(labels)
    return min(tally, key=lambda label: (-tally[label], label))


def _fill_empty(assigned: dict[str, list[int]], size_of: list[int]) -> None:
    """Give each empty split the smallest cluster of the split holding the most clusters, while one has two."""
    for parts in assigned.values():
        if parts:
            continue
        donor = max(assigned.values(), key=len)
        if len(donor) < 2:
            return
        smallest = min(range(len(donor)), key=lambda i: (size_of[donor[i]], -i))
        parts.append(donor.pop(smallest))


def cross_split_rows(splits: dict[str, Sequence[int]], sketches: Sketches, threshold: float = 0.8) -> tuple[int, int]:
    """(rows with a near duplicate in another split, rows in the splits): `splits` holds each split's rows
    (of `sketches`; a row in none is left out), measured on the text splits are de-duplicated on, MinHash
    Jaccard at `threshold`. Texts without words are exact duplicates of each other: each one after the first
    (in split order) counts when it is in another split than the first."""
    split_of = np.full(len(sketches), -1, dtype=np.int64)
    for number, rows in enumerate(splits.values()):
        split_of[np.asarray(rows, dtype=np.int64)] = number
    left, right = sketches.pairs(threshold)
    a, b = split_of[left], split_of[right]
    crossing = (a >= 0) & (b >= 0) & (a != b)
    count = len(np.unique(np.concatenate([left[crossing], right[crossing]])))
    wordless = split_of[~sketches.has_words & (split_of >= 0)]
    if len(wordless):  # the first in split order is in the first split holding any: the rest of them count
        count += int(np.count_nonzero(wordless != wordless.min()))
    return count, sum(map(len, splits.values()))


def cross_split_duplicates(splits: dict[str, list[Example]], threshold: float = 0.8,
                           sketches: ExampleSketches | None = None) -> tuple[int, int]:
    """`cross_split_rows` over splits of examples (`sketches`: the examples' sketches when known, by id)."""
    keyed = [ex for part in splits.values() for ex in part]
    known = sketches.sketches.take(sketches.rows(keyed)) if sketches is not None else ExampleSketches(keyed).sketches
    bounds = np.cumsum([0, *map(len, splits.values())]).tolist()
    return cross_split_rows({name: range(lo, hi) for name, lo, hi in zip(splits, bounds, bounds[1:])}, known, threshold)
