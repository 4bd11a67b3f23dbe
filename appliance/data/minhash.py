"""MinHash values of texts, as datasketch computes them, without datasketch: the word tokens, the hash of a
text's words (exact duplicates), and the values of `MinHash(num_perm, seed)` over word shingles for many texts
at once. Shared by the run's duplicate filter (`filters.NearDuplicateIndex`) and the sketches an export splits
on (`sketches`); it imports neither datasketch (scipy: 1 s) nor pydantic, which an export does not need."""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import NamedTuple

import numpy as np

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercase Unicode word tokens (`\\w+`): the unit of the echo, grounding and duplicate measures."""
    return _WORD.findall(text.lower())


class Sketch:
    """A finished MinHash as `MinHashLSH` reads it (its length, hash values and scheme): what datasketch's
    `LeanMinHash` keeps, without the validation that cost more per text than computing the values."""
    __slots__ = ("hashvalues",)
    scheme = "affine32"

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:  # MinHashLSH checks it against its permutations
        return len(self.hashvalues)

    def jaccard(self, other: Sketch) -> float:  # as `MinHash.jaccard`: the share of equal hash values
        return float(np.count_nonzero(self.hashvalues == other.hashvalues)) / float(len(self.hashvalues))


class Signature(NamedTuple):
    """What the index knows of one text, computed once: the hash of its normalized words (exact
    duplicates) and its MinHash (None for a text without words, which can only be an exact duplicate)."""

    digest: str
    minhash: Sketch | None


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's affine32 permutations for (num_perm, seed) (`MinHash(num_perm, seed).permutations`, drawn
    the same way), made once per process: `MinHash()` draws them again on every call, which was most of
    the cost of hashing 100k texts; drawn here without importing datasketch, which imports scipy (1 s)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return np.array([a, gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)])


def _fmix32(hv: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: datasketch's affine32 pre-mix of every hash (uint32 wraps, as intended)."""
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        hv = (hv ^ (hv >> np.uint32(shift))) * np.uint32(mult)
    return hv ^ (hv >> np.uint32(16))


def _shingle_hashes(tokens: list[str], shingle: int) -> bytes:
    """The 32-bit SHA-1 hash (datasketch's `sha1_hash32`, little-endian) of each distinct word shingle."""
    size = shingle if len(tokens) >= shingle else 1
    sha1 = hashlib.sha1
    return b"".join([sha1(s.encode()).digest()[:4] for s in {" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1)}])


BATCH_TEXTS = 500  # texts per numpy batch: at 60 shingles each, 15 MB of permuted values


def minhash_values(token_lists: list[list[str]], num_perm: int = 128, seed: int = 1, shingle: int = 3) -> np.ndarray:
    """The hash values `MinHash(num_perm, seed).update_batch(shingles)` gives each non-empty token list,
    one row each, computed for many texts at once: the same murmur pre-mix and affine permutations as
    datasketch's affine32 scheme, applied to every shingle of a batch in one numpy expression and
    reduced per text with `minimum.reduceat` instead of one `MinHash` object and call per text."""
    a, b = _permutations(num_perm, seed)
    hashed = [_shingle_hashes(tokens, shingle) for tokens in token_lists]
    out = np.empty((len(hashed), num_perm), dtype=np.uint32)
    for lo in range(0, len(hashed), BATCH_TEXTS):
        part = hashed[lo : lo + BATCH_TEXTS]
        offsets = np.cumsum([0] + [len(h) // 4 for h in part[:-1]])
        hv = _fmix32(np.frombuffer(b"".join(part), dtype="<u4").astype(np.uint32))
        # permutations x shingles, reduced along rows: 10x faster than shingles x permutations along columns
        out[lo : lo + len(part)] = np.minimum.reduceat(hv[None, :] * a[:, None] + b[:, None], offsets, axis=1).T
    return out


def words_digest(tokens: list[str]) -> str:
    """Hash of the normalized text (its lowercase words joined by single spaces): equal for exact duplicates."""
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()
