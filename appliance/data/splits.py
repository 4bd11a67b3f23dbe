"""Splits: leak-free and deterministic. Lineage groups and near-duplicate clusters stay whole, so no source
chunk and no near-duplicate pair is seen in both train and test."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable

from .examples import Example, ExportError, dedup_text
from .filters import NearDuplicateIndex, Signature


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
    for i, ex in enumerate(examples):
        if ex.group is not None:
            union(i, first_of_group.setdefault(ex.group, i))
    index = NearDuplicateIndex(threshold=threshold)
    for i, j in index.duplicate_pairs(_signatures(index, examples)):
        union(i, j)
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


def cross_split_duplicates(splits: dict[str, list["Example"]], threshold: float = 0.8) -> tuple[int, int]:
    """(examples with a near duplicate in another split, examples): measured on the text splits are
    de-duplicated on, MinHash Jaccard at `threshold`."""
    index = NearDuplicateIndex(threshold=threshold)
    keyed = [(name, ex) for name, part in splits.items() for ex in part]
    signatures = _signatures(index, [ex for _, ex in keyed])
    crossing: set[int] = set()
    for i, j in index.duplicate_pairs(signatures):
        if keyed[i][0] != keyed[j][0]:
            crossing.update((i, j) if signatures[j].minhash is not None else (j,))
    return len(crossing), len(keyed)


# The signatures of the last examples split, by example object: `export` splits a run and then measures
# its cross-split duplicates on the same Example objects, and each MinHash is computed once, not twice.
# Keyed by identity (the entry keeps its example alive, so an id is never reused while cached) rather
# than by text, which would hold a second copy of every text.
_last_signatures: dict[tuple[int, int, int, int], tuple[Example, Signature]] = {}


def _signatures(index: NearDuplicateIndex, examples: list[Example]) -> list[Signature]:
    """Each example's signature for `index`, in bulk, reusing those of the previous call for the same
    example objects (one call's worth is kept: about 1 KiB per example)."""
    global _last_signatures
    keys = [(index.num_perm, index.seed, index.shingle, id(ex)) for ex in examples]
    known = {k: hit for k, ex in zip(keys, examples) if (hit := _last_signatures.get(k)) is not None and hit[0] is ex}
    missing = [(k, ex) for k, ex in zip(keys, examples) if k not in known]
    known.update((k, (ex, sig)) for (k, ex), sig in zip(missing, index.signatures([dedup_text(ex) for _, ex in missing])))
    _last_signatures = known
    return [known[k][1] for k in keys]
