"""MinHash sketches of many texts at once: computed in bulk, stored with every kept example (the
`examples.minhash` column, so `export` reads them instead of hashing 100k texts again), and the
near-duplicate pairs among them found per LSH band with numpy.

The values are datasketch's (`MinHash(num_perm=128, seed=1)`, affine32 scheme, over the word 3-shingles
of `words(text)`; `minhash.minhash_values` computes them), and the bands are `MinHashLSH`'s, so the pairs,
clusters and splits are the ones `NearDuplicateIndex` gives, whichever path made a sketch. Nothing here
imports datasketch (it imports scipy: 1 s) unless asked for bands it has not got in `_BANDS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any

import numpy as np

from .examples import Example, dedup_text
from .minhash import Signature, minhash_values, words, words_digest

# The sketch every stored example has: NearDuplicateIndex's defaults. `examples.minhash` holds NUM_PERM
# little-endian uint32 values (STORED.itemsize * NUM_PERM = 512 bytes); b"" for a text without words.
NUM_PERM, SEED, SHINGLE = 128, 1, 3
STORED = np.dtype("<u4")
ROW_BYTES = NUM_PERM * STORED.itemsize
_BATCH = 2000  # texts tokenised at a time: only one batch's words are held

# MinHashLSH's (bands, rows per band) for (threshold, num_perm): datasketch finds them by integrating its
# error curves with scipy (1 s to import, 0.3 s to compute). tests/test_scale.py checks each entry against it.
_BANDS = {(0.8, 128): (9, 13)}


class Sketches:
    """The MinHash values of many texts as one (texts x NUM_PERM) uint32 matrix; a text without words has
    a row of zeros and `has_words` False (it can only be an exact duplicate of another such text)."""

    __slots__ = ("_pairs", "has_words", "values")

    def __init__(self, values: np.ndarray, has_words: np.ndarray) -> None:
        self.values, self.has_words = values, has_words
        self._pairs: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """`near_pairs(self, threshold)`, computed once per threshold (a split and its cross-split count share them)."""
        if threshold not in self._pairs:
            self._pairs[threshold] = near_pairs(self, threshold)
        return self._pairs[threshold]

    def __len__(self) -> int:
        return len(self.has_words)

    def take(self, rows: Sequence[int] | np.ndarray) -> Sketches:
        rows = np.asarray(rows, dtype=np.int64)
        return Sketches(self.values[rows], self.has_words[rows])

    def blob(self, row: int) -> bytes:
        """Row `row` as `examples.minhash` stores it."""
        return self.values[row].astype(STORED, copy=False).tobytes() if self.has_words[row] else b""


def sketch_texts(texts: Iterable[str]) -> Sketches:
    """Every text's sketch, hashed in bulk: the values of one `MinHash(NUM_PERM, SEED)` per text."""
    texts = list(texts)
    values = np.zeros((len(texts), NUM_PERM), dtype=np.uint32)
    has_words = np.zeros(len(texts), dtype=bool)
    for lo in range(0, len(texts), _BATCH):
        tokens = [words(t) for t in texts[lo : lo + _BATCH]]
        rows = np.flatnonzero([bool(t) for t in tokens])
        if len(rows):
            values[lo + rows] = minhash_values([tokens[i] for i in rows], NUM_PERM, SEED, SHINGLE)
            has_words[lo + rows] = True
    return Sketches(values, has_words)


def _usable(blob: bytes | None) -> bool:
    return blob is not None and len(blob) in (0, ROW_BYTES)


def read_sketches(stored: Sequence[bytes | None], text: Callable[[int], str]) -> Sketches:
    """The sketches of rows whose `examples.minhash` values are `stored`: a usable one is read, a missing one
    (NULL: a database from before migration 8) is computed with `sketch_texts` from `text(row)`."""
    if all(stored) and set(map(len, stored)) == {ROW_BYTES}:  # the usual case: every row has one, with words
        values = np.frombuffer(b"".join(stored), dtype=STORED).reshape(len(stored), NUM_PERM)  # type: ignore[arg-type]
        return Sketches(values.astype(np.uint32, copy=False), np.ones(len(stored), dtype=bool))
    read = [i for i, blob in enumerate(stored) if _usable(blob)]
    missing = sorted(set(range(len(stored))) - set(read))
    computed = sketch_texts(text(i) for i in missing)
    values = np.zeros((len(stored), NUM_PERM), dtype=np.uint32)
    has_words = np.zeros(len(stored), dtype=bool)
    full = [i for i in read if stored[i]]
    if full:
        values[full] = np.frombuffer(b"".join(stored[i] for i in full), dtype=STORED).reshape(len(full), NUM_PERM)  # type: ignore[misc]
        has_words[full] = True
    if missing:
        values[missing], has_words[missing] = computed.values, computed.has_words
    return Sketches(values, has_words)


class ExampleSketches:
    """The sketches of a set of examples (each over `dedup_text(example)`), by example id: what a task run
    splits on and stores, and what `split_examples` and `cross_split_duplicates` share when handed one.

    `stored` (aligned with `examples`): the `examples.minhash` values of their rows (`read_sketches`)."""

    def __init__(self, examples: Sequence[Example], stored: Sequence[bytes | None] | None = None) -> None:
        stored = stored if stored is not None else [None] * len(examples)
        if len(stored) != len(examples):
            raise ValueError(f"{len(stored)} stored sketches for {len(examples)} examples")
        self._row = dict(zip(map(attrgetter("id"), examples), range(len(examples))))
        self.sketches = read_sketches(stored, lambda i: dedup_text(examples[i]))

    def __len__(self) -> int:
        return len(self.sketches)

    def rows(self, examples: Sequence[Example]) -> np.ndarray:
        """The row of each of `examples` (every one of them among those this was made for), by id."""
        return np.fromiter(map(self._row.__getitem__, map(attrgetter("id"), examples)), dtype=np.int64, count=len(examples))

    def near_pairs(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        return self.sketches.pairs(threshold)

    def blob(self, example_id: str) -> bytes:
        return self.sketches.blob(self._row[example_id])


def _example_of_row(row: Mapping[str, Any]) -> Example:
    messages = row.get("messages_json")
    return Example(id="", instruction=row["instruction"], input=row.get("input") or "", output=row["output"],
                   messages=json.loads(messages) if messages else None)


def add_minhashes(rows: Sequence[dict[str, Any]], known: Sequence[Signature | None] | None = None) -> None:
    """Set `minhash` in every kept `examples` row (a dict with its columns) to the stored sketch of its
    `dedup_text`, computed in bulk; dropped rows get None (export reads only kept ones).

    `known` (aligned with `rows`) are signatures already computed by a duplicate filter with the default
    sketch (`NearDuplicateIndex()`), each of the text that filter checked: one is reused when that text
    has the same words as the example's `dedup_text` (so the same sketch), instead of hashing it again."""
    known = known if known is not None else [None] * len(rows)
    todo: list[tuple[dict[str, Any], str]] = []
    for row, sig in zip(rows, known):
        if not row.get("kept"):
            row["minhash"] = None
            continue
        text = dedup_text(_example_of_row(row))
        if sig is not None and (sig.minhash is None or len(sig.minhash) == NUM_PERM) and sig.digest == words_digest(words(text)):
            row["minhash"] = b"" if sig.minhash is None else sig.minhash.hashvalues.astype(STORED, copy=False).tobytes()
        else:
            todo.append((row, text))
    computed = sketch_texts(text for _, text in todo)
    for i, (row, _) in enumerate(todo):
        row["minhash"] = computed.blob(i)


@lru_cache(maxsize=16)
def band_ranges(threshold: float, num_perm: int = NUM_PERM) -> tuple[tuple[int, int], ...]:
    """The (start, end) hash-value ranges of `MinHashLSH(threshold=min(threshold, 0.95), num_perm)`'s bands
    (it cannot band above 0.95: candidates are checked against `threshold` after)."""
    key = (min(threshold, 0.95), num_perm)
    if key in _BANDS:
        b, r = _BANDS[key]
        return tuple((i * r, (i + 1) * r) for i in range(b))
    from datasketch import (
        MinHashLSH,  # here: datasketch imports scipy (1 s), needed only for other thresholds
    )

    return tuple(MinHashLSH(threshold=key[0], num_perm=num_perm).hashranges)


@lru_cache(maxsize=4)
def _weights(n: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per value of a band, fixed for a width."""
    return np.random.RandomState(n).randint(0, 1 << 62, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _band_keys(values: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    """A 64-bit hash of each row's values in each band (rows x bands): equal bands, equal keys. Computed a
    few thousand rows at a time over all bands at once, so each row's values are read as one run of memory."""
    width = ranges[0][1] - ranges[0][0]
    if any(end - start != width or start != i * width for i, (start, end) in enumerate(ranges)):
        raise ValueError(f"bands of unequal width: {ranges}")
    weights = _weights(width)
    keys = np.empty((len(values), len(ranges)), dtype=np.uint64)
    for lo in range(0, len(values), 8192):
        chunk = values[lo : lo + 8192, : len(ranges) * width].reshape(-1, len(ranges), width)
        keys[lo : lo + 8192] = chunk.astype(np.uint64) @ weights  # wraps modulo 2**64, as a hash may
    return keys


def _equal_key_pairs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows with equal keys: rows sorted by key, each run of two or more expanded into
    its pairs with numpy (a run of k rows gives k(k-1)/2 pairs, as a dictionary of LSH buckets would)."""
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    sizes = np.diff(np.append(starts, len(key)))
    starts, sizes = starts[sizes > 1], sizes[sizes > 1]
    # every position in a run of two or more, paired with each later position of its run
    pos = np.repeat(starts, sizes) + np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    later = np.repeat(starts + sizes, sizes) - pos - 1
    left = np.repeat(pos, later)
    right = left + 1 + np.arange(later.sum()) - np.repeat(np.cumsum(later) - later, later)
    a, b = order[left], order[right]
    return np.minimum(a, b), np.maximum(a, b)


def near_pairs(sketches: Sketches, threshold: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Rows (i, j), i < j, of every pair of texts with words that share an LSH band (MinHashLSH's bands)
    and have estimated Jaccard at least `threshold`: `NearDuplicateIndex(threshold)`'s near duplicates,
    and its exact duplicates with words (the same words give the same values), found at once."""
    rows = np.flatnonzero(sketches.has_words)
    values = sketches.values if len(rows) == len(sketches) else sketches.values[rows]
    empty = np.empty(0, dtype=np.int64)
    if len(rows) < 2:
        return empty, empty
    ranges = band_ranges(threshold, values.shape[1])
    keys = _band_keys(values, ranges)
    codes = [empty]
    for band, (start, end) in enumerate(ranges):
        a, b = _equal_key_pairs(keys[:, band])
        same = np.all(values[a, start:end] == values[b, start:end], axis=1)  # the same band, not just the same hash
        codes.append(a[same] * len(rows) + b[same])
    unique = np.unique(np.concatenate(codes))
    left, right, keep = unique // len(rows), unique % len(rows), np.zeros(len(unique), dtype=bool)
    for lo in range(0, len(left), 16384):  # 16k pairs (16 MB of compared values) at a time
        a, b = left[lo : lo + 16384], right[lo : lo + 16384]
        keep[lo : lo + 16384] = np.count_nonzero(values[a] == values[b], axis=1) / float(values.shape[1]) >= threshold
    return rows[left[keep]], rows[right[keep]]


def duplicate_pairs(sketches: Sketches, threshold: float = 0.8) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of the sketched texts that `NearDuplicateIndex(threshold)` calls duplicates:
    `near_pairs`, and the texts without words (exact duplicates of each other), each paired with the first."""
    empty = np.flatnonzero(~sketches.has_words).tolist()
    left, right = near_pairs(sketches, threshold)
    return sorted([(empty[0], i) for i in empty[1:]] + list(zip(left.tolist(), right.tolist())))
