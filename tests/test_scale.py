"""Datasets of 100,000 items (issue 22): the fast paths give the results the slow ones gave.

The near-duplicate index now hashes texts in bulk with permutations made once; the old index (one
datasketch `MinHash` per call, made twice per kept text) is kept here, verbatim, so the verdicts,
clusters and splits of the new one are compared with it on a few thousand texts with near duplicates.
"""

from __future__ import annotations

import importlib.util
import random
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from appliance import export as export_module
from appliance.data import minhash as minhash_module
from appliance.data import sketches as sketches_module
from appliance.data.examples import Example, dedup_text
from appliance.data.filters import (
    DuplicateMatch,
    NearDuplicateIndex,
    Verdict,
    minhash_values,
    words,
)
from appliance.data.sketches import (
    ExampleSketches,
    band_ranges,
    duplicate_pairs,
    sketch_texts,
)
from appliance.data.splits import cross_split_duplicates, split_examples
from appliance.export import export_run
from appliance.prompts.files import parse_prompt
from appliance.runs.queries import search_generations
from appliance.store import Store


class OldIndex:
    """NearDuplicateIndex as it was before issue 22 (appliance/data/filters.py at 0a7c9c9)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3, seed: int = 1) -> None:
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.lsh = MinHashLSH(threshold=min(threshold, 0.95), num_perm=num_perm)
        self.exact: dict[str, str] = {}
        self.hashes: dict[str, MinHash] = {}
        self.order: dict[str, int] = {}

    def minhash(self, tokens: list[str]) -> MinHash:
        size = self.shingle if len(tokens) >= self.shingle else 1
        shingles = {" ".join(tokens[i : i + size]).encode() for i in range(len(tokens) - size + 1)}
        mh = MinHash(num_perm=self.num_perm, seed=self.seed)
        mh.update_batch(sorted(shingles))
        return mh

    def matches(self, text: str) -> list[DuplicateMatch]:
        import hashlib

        tokens = words(text)
        found: dict[str, DuplicateMatch] = {}
        exact = self.exact.get(hashlib.sha256(" ".join(tokens).encode()).hexdigest())
        if exact is not None:
            found[exact] = DuplicateMatch(exact, 1.0, True)
        if tokens and self.hashes:
            mh = self.minhash(tokens)
            for key in self.lsh.query(mh):
                similarity = float(mh.jaccard(self.hashes[key]))
                if key not in found and similarity >= self.threshold:
                    found[key] = DuplicateMatch(key, similarity, False)
        return sorted(found.values(), key=lambda m: (not m.exact, -m.similarity, self.order[m.key]))

    def insert(self, key: str, text: str) -> None:
        import hashlib

        tokens = words(text)
        self.order[key] = len(self.order)
        self.exact.setdefault(hashlib.sha256(" ".join(tokens).encode()).hexdigest(), key)
        if tokens:
            mh = self.minhash(tokens)
            self.hashes[key] = mh
            self.lsh.insert(key, mh)

    def check(self, key: str, text: str) -> Verdict:
        found = self.matches(text)
        if not found:
            self.insert(key, text)
            return Verdict(filter="duplicate", passed=True, reason="no earlier duplicate")
        match = found[0]
        if match.exact:
            return Verdict(filter="duplicate", passed=False, score=1.0, reason=f"exact duplicate of item {match.key}")
        return Verdict(filter="duplicate", passed=False, score=match.similarity,
                       reason=f"near-duplicate of item {match.key} (estimated Jaccard {match.similarity:.2f})")


def old_clusters(examples: list[Example], threshold: float, sketches: object = None) -> list[list[Example]]:
    """splits._clusters before issue 22, over the old index."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[max(find(i), find(j))] = min(find(i), find(j))

    first_of_group: dict[str, int] = {}
    index = OldIndex(threshold=threshold)
    position = {ex.id: i for i, ex in enumerate(examples)}
    for i, ex in enumerate(examples):
        if ex.group is not None:
            union(i, first_of_group.setdefault(ex.group, i))
        text = dedup_text(ex)
        for match in index.matches(text):
            union(i, position[match.key])
        index.insert(ex.id, text)
    members: dict[int, list[Example]] = {}
    for i, ex in enumerate(examples):
        members.setdefault(find(i), []).append(ex)
    return [members[root] for root in sorted(members)]


def old_split_examples(examples: list[Example], ratios: dict[str, float], seed: int = 0, near_dup_threshold: float = 0.8,
                       stratify: bool = True, sketches: object = None) -> dict[str, list[Example]]:
    """split_examples before issue 22 (on lists of examples, over the old index's clusters), verbatim but for names."""
    ordered = sorted(examples, key=lambda ex: ex.id)
    rng = random.Random(seed)
    clusters = old_clusters(ordered, near_dup_threshold)
    strata: dict[str, list[list[Example]]] = {}
    use_labels = stratify and any(ex.label is not None for ex in ordered)
    for cluster in clusters:
        strata.setdefault(old_main_label(cluster) if use_labels else "", []).append(cluster)
    assigned: dict[str, list[list[Example]]] = {name: [] for name in ratios}
    counts = dict.fromkeys(ratios, 0)
    seen = 0
    for key in sorted(strata):
        stratum = strata[key]
        rng.shuffle(stratum)
        seen += sum(map(len, stratum))
        names, goal = list(ratios), [ratio * seen for ratio in ratios.values()]
        have = [counts[name] for name in names]
        for cluster in stratum:
            best, best_gap, best_have = 0, round(goal[0] - have[0], 9), have[0]
            for k in range(1, len(names)):
                gap = round(goal[k] - have[k], 9)
                if gap > best_gap or (gap == best_gap and have[k] < best_have):
                    best, best_gap, best_have = k, gap, have[k]
            assigned[names[best]].append(cluster)
            have[best] += len(cluster)
        counts.update(zip(names, have))
    for parts in assigned.values():
        if parts:
            continue
        donor = max(assigned.values(), key=len)
        if len(donor) < 2:
            break
        smallest = min(range(len(donor)), key=lambda i: (len(donor[i]), -i))
        parts.append(donor.pop(smallest))
    result = {}
    for name, parts in assigned.items():
        split = sorted((ex for cluster in parts for ex in cluster), key=lambda ex: ex.id)
        rng.shuffle(split)
        result[name] = split
    return result


def old_main_label(cluster: list[Example]) -> str:
    if len(cluster) == 1:
        return cluster[0].label or ""
    tally: dict[str, int] = {}
    for ex in cluster:
        tally[ex.label or ""] = tally.get(ex.label or "", 0) + 1
    return min(tally, key=lambda label: (-tally[label], label))


def texts_with_near_duplicates(n: int, seed: int = 5) -> list[str]:
    """Texts of 0-40 words; a fifth repeat an earlier one with a word or two changed, at every Jaccard
    from well above to well below 0.8, so verdicts near the threshold are compared too."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.2:
            tokens = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                if tokens:
                    tokens[rng.randrange(len(tokens))] = rng.choice(vocab)
            out.append(" ".join(tokens) + rng.choice(["", ".", "!"]))
        else:
            out.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))))
    return out


def test_bulk_hash_values_are_datasketchs() -> None:
    texts = texts_with_near_duplicates(500)
    tokens = [words(t) for t in texts if words(t)]
    old = OldIndex()
    for row, toks in zip(minhash_values(tokens), tokens):
        assert (row == old.minhash(toks).hashvalues).all()


def test_duplicate_verdicts_unchanged() -> None:
    texts = texts_with_near_duplicates(3000)
    old, new = OldIndex(), NearDuplicateIndex()
    verdicts = [(old.check(str(i), t), new.check(str(i), t)) for i, t in enumerate(texts)]
    assert all(a == b for a, b in verdicts)
    dropped = [a for a, _ in verdicts if not a.passed]
    assert any("near-duplicate" in v.reason for v in dropped) and any("exact" in v.reason for v in dropped)
    assert any(v.passed for v, _ in verdicts)


def test_bulk_signatures_give_the_same_matches_as_texts() -> None:
    texts = texts_with_near_duplicates(800, seed=9)
    by_text, by_signature = NearDuplicateIndex(), NearDuplicateIndex()
    signatures = by_signature.signatures(texts)
    for i, (text, sig) in enumerate(zip(texts, signatures)):
        assert by_text.matches(text) == by_signature.matches(sig)
        by_text.insert(str(i), text)
        by_signature.insert(str(i), sig)


@pytest.fixture
def examples() -> list[Example]:
    texts = texts_with_near_duplicates(3000, seed=11)
    rng = random.Random(3)
    return [Example(id=str(i), instruction="Write a review.", output=t, group=f"chunk:{rng.randrange(2000)}" if i % 3 == 0 else None,
                    label=rng.choice(["good", "bad", None]))
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("ratios", [{"train": 0.8, "validation": 0.1, "test": 0.1}, {"train": 0.9, "test": 0.1},
                                    {"train": 0.5, "rare": 0.0004, "test": 0.4996}])
def test_splits_unchanged_for_a_seed(examples: list[Example], ratios: dict[str, float]) -> None:
    """The splits are the ones split_examples gave before issue 22 (examples, the old index's clusters), for
    several seeds, with labels (stratified) and without, and with a split too small for any cluster (filled)."""
    unlabelled = [replace(ex, label=None) for ex in examples]
    shuffled = random.Random(1).sample(examples, len(examples))  # the input order does not matter
    for seed in (0, 7, 123):
        for rows, stratify in ((examples, True), (shuffled, True), (examples, False), (unlabelled, True)):
            new = split_examples(rows, ratios, seed=seed, stratify=stratify)
            old = old_split_examples(rows, ratios, seed=seed, stratify=stratify)
            assert {k: [ex.id for ex in v] for k, v in new.items()} == {k: [ex.id for ex in v] for k, v in old.items()}
    assert all(new.values())


def test_cross_split_count_unchanged(examples: list[Example]) -> None:
    parts = split_examples(examples, {"train": 0.8, "validation": 0.1, "test": 0.1})
    old_index, split_of = OldIndex(), {}
    for name, part in parts.items():
        for ex in part:
            split_of[f"{name}\x00{ex.id}"] = name
            old_index.insert(f"{name}\x00{ex.id}", dedup_text(ex))
    crossing_old = sum(any(split_of[m.key] != name for m in old_index.matches(dedup_text(ex)))
                       for name, part in parts.items() for ex in part)
    assert cross_split_duplicates(parts) == (crossing_old, len(examples))


def test_cross_split_count_sees_near_duplicates_planted_across_splits() -> None:
    base = "the kettle boils fast and the handle stays cool while the lid clicks shut every single time"
    splits = {"train": [Example(id="1", instruction="a", output=base)],
              "test": [Example(id="2", instruction="a", output=base + " indeed"), Example(id="3", instruction="a", output="unrelated words here")]}
    assert cross_split_duplicates(splits) == (2, 3)


def test_prompt_template_compiled_once_for_many_items(monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = parse_prompt("+++\n[vars]\nx = 1\n+++\nA review {{ x }} of a thing unique to this test:", "t")
    compiled = []
    real = jinja2.sandbox.SandboxedEnvironment.from_string
    monkeypatch.setattr(jinja2.sandbox.SandboxedEnvironment, "from_string",
                        lambda self, source, *a, **k: compiled.append(source) or real(self, source, *a, **k))
    assert [prompt.render({"x": i}) for i in range(50)][-1].endswith("49 of a thing unique to this test:")
    assert len(compiled) <= 1


def _grown(path: Path, n: int) -> Store:
    """A store with two runs whose generations interleave (ids of run 1 and run 2 alternate)."""
    store = Store(path)
    runs = [store.start_run(kind="generate", requested=n) for _ in range(2)]
    with store.transaction() as conn:
        for i in range(n):
            conn.execute("INSERT INTO generations (run_id, item_key, item_index, rendered_prompt, output, seed, tokens_in, tokens_out, "
                         "ms, finish_reason, parallel, created_at) VALUES (?, ?, ?, 'Review:', ?, 1, 1, 1, 1, 'stop', 1, '')",
                         [runs[i % 2], f"k{i}", i // 2, f"kettle number {i} " + ("lamp" if i % 10 == 0 else "")])
    return store


def test_logs_newest_first_without_sorting_every_match(tmp_path: Path) -> None:
    store = _grown(tmp_path / "a.db", 400)
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    assert [r["id"] for r in search_generations(store, limit=5, run_id=1)] == [399, 397, 395, 393, 391]
    assert [r["id"] for r in search_generations(store, limit=3, query="lamp")] == [391, 381, 371]
    assert [r["id"] for r in search_generations(store, limit=2, query="kettle", run_id=2)] == [400, 398]
    assert [r["id"] for r in search_generations(store, limit=0, query="lamp", run_id=2)] == []
    assert len(search_generations(store, limit=0, query="lamp")) == 40
    store.conn.set_trace_callback(None)
    selects = [s for s in statements if s.startswith("SELECT g.id") or "FROM generations" in s and "ORDER BY" in s]
    assert len(selects) == 5
    for sql in selects:
        plan = " / ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "TEMP B-TREE" not in plan, (sql, plan)


def test_migration_6_index(tmp_path: Path) -> None:
    Store(tmp_path / "a.db").close()
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 'generations_run_newest'").fetchone()[0].endswith("(run_id, id)")


def test_browse_suggests_no_facets(tmp_path: Path) -> None:
    from appliance.views.browse import make_datasette

    Store(tmp_path / "a.db").close()
    assert make_datasette(tmp_path / "a.db").setting("suggest_facets") is False


# ---------------------------------------------------------------------------------------------
# Stored MinHashes (migration 8): written with each kept example, read by export.


def old_pairs(texts: list[str], threshold: float = 0.8) -> set[tuple[int, int]]:
    """The duplicate pairs (earlier, later) the old index finds, one text at a time."""
    index, pairs = OldIndex(threshold=threshold), set()
    for i, text in enumerate(texts):
        pairs.update((int(m.key), i) for m in index.matches(text))
        index.insert(str(i), text)
    return pairs


def old_crossing(splits: dict[str, list[Example]]) -> int:
    """cross_split_duplicates before issue 22: examples with a duplicate (by the old index) in another split."""
    keyed = [(name, ex) for name, part in splits.items() for ex in part]
    pairs = old_pairs([dedup_text(ex) for _, ex in keyed])
    crossing: set[int] = set()
    for i, j in pairs:
        if keyed[i][0] != keyed[j][0]:
            crossing.update((i, j) if words(dedup_text(keyed[j][1])) else (j,))
    return len(crossing)


def test_permutations_and_bands_are_datasketchs() -> None:
    for num_perm, seed in ((128, 1), (64, 7)):
        assert (minhash_module._permutations(num_perm, seed) == MinHash(num_perm=num_perm, seed=seed).permutations).all()
    for (threshold, num_perm), (b, r) in sketches_module._BANDS.items():
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert (lsh.b, lsh.r) == (b, r)
        assert list(band_ranges(threshold, num_perm)) == list(lsh.hashranges)
    assert list(band_ranges(0.6)) == list(MinHashLSH(threshold=0.6, num_perm=128).hashranges)  # not in the table


@pytest.mark.parametrize("threshold", [0.8, 0.6])
def test_bulk_pairs_are_the_old_index_pairs(threshold: float) -> None:
    texts = texts_with_near_duplicates(3000, seed=13) + ["", "!", "the kettle", "The kettle."]
    pairs = duplicate_pairs(sketch_texts(texts), threshold)
    assert pairs == sorted(old_pairs(texts, threshold))
    assert len(pairs) > 100 and (3002, 3003) in pairs  # exact ones too, with words and without (each with the first)
    assert any(j == 3001 and not words(texts[i]) for i, j in pairs)


def test_cross_split_count_unchanged_on_splits_that_leak() -> None:
    texts = texts_with_near_duplicates(2000, seed=17)
    rng = random.Random(4)
    examples = [Example(id=str(i), instruction="Write.", output=t) for i, t in enumerate(texts)]
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for ex in examples:  # assigned at random: near duplicates land in different splits
        splits[rng.choice(list(splits))].append(ex)
    expected = old_crossing(splits)
    assert expected > 50
    assert cross_split_duplicates(splits) == (expected, len(examples))
    reordered = list(reversed(examples))  # sketches made for the same examples in another order, found by id
    assert cross_split_duplicates(splits, sketches=ExampleSketches(reordered)) == (expected, len(examples))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).resolve().parent.parent / "scripts" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[int]]:
    """A synthetic run of 600 items (about 5% near duplicates) made by the bench through the project's own
    items, writer, judge and store_judgement; and how many texts store_judgement hashed itself."""
    tmp = tmp_path_factory.mktemp("grown")
    bench, hashed = _bench(), []
    real = sketches_module.sketch_texts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sketches_module, "sketch_texts", lambda texts: (texts := list(texts), hashed.append(len(texts)), real(texts))[2])
        run_id, _ = bench.grow(tmp / "a.db", bench.scale_recipe(tmp, 600), 600)
    return tmp / "a.db", run_id, hashed


def test_stored_minhashes_are_the_recomputed_ones(grown: tuple[Path, int, list[int]]) -> None:
    db, run_id, hashed = grown
    store = Store(db, readonly=True)
    rows = store.rows("SELECT id, instruction, input, output, messages_json, kept, minhash FROM examples WHERE run_id = ? ORDER BY id", [run_id])
    kept = [r for r in rows if r["kept"]]
    assert len(kept) > 500 and len(rows) > len(kept)
    assert all(r["minhash"] is None for r in rows if not r["kept"])
    texts = [dedup_text(Example(id="", instruction=r["instruction"], input=r["input"], output=r["output"])) for r in kept]
    recomputed = sketch_texts(texts)
    assert [r["minhash"] for r in kept] == [recomputed.blob(i) for i in range(len(kept))]
    old = OldIndex()
    for r, text in list(zip(kept, texts))[:50]:  # the values datasketch gives, as stored (little-endian uint32)
        assert (np.frombuffer(r["minhash"], dtype="<u4") == old.minhash(words(text)).hashvalues).all()
    assert hashed == [0]  # every kept example's MinHash was the duplicate filter's, not hashed again


def _export(db: Path, out: Path, readonly: bool = True) -> str:
    """Every file of `export RUN --split train=0.8,validation=0.1,test=0.1`, the card without its timestamp."""
    out.mkdir()
    store = Store(db, readonly=readonly)
    export_run(store, 1, "jsonl", out / "d.jsonl", split="train=0.8,validation=0.1,test=0.1", seed=3)
    store.close()
    return "".join(f"== {p.name}\n" + "".join(line for line in p.read_text().splitlines(True) if not line.startswith("- exported "))
                   for p in sorted(out.iterdir()))


def test_export_is_the_same_without_stored_minhashes(grown: tuple[Path, int, list[int]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    db, _, _ = grown
    stored = _export(db, tmp_path / "stored")
    nulls, dropped = tmp_path / "nulls.db", tmp_path / "dropped.db"
    for copy, sql in ((nulls, "UPDATE examples SET minhash = NULL"), (dropped, "ALTER TABLE examples DROP COLUMN minhash")):
        copy.write_bytes(db.read_bytes())
        conn = sqlite3.connect(copy)
        conn.execute(sql)
        conn.commit()
        conn.close()
    assert _export(nulls, tmp_path / "nulls") == stored  # rows written before migration 8: computed at export
    assert _export(dropped, tmp_path / "dropped") == stored  # a database from before it, opened read-only
    # the old split and cross-split count, on examples over the old index: the same files
    read, columns = export_module._kept_examples, []

    def kept(store: Store, run_id: int) -> tuple:
        out = read(store, run_id)
        columns.append(out[0])
        return out

    def old_split(ids: list[str], groups: object, labels: object, sketches: object, ratios: dict[str, float], seed: int = 0) -> dict[str, list[int]]:
        row = {ex_id: i for i, ex_id in enumerate(ids)}
        return {name: [row[ex.id] for ex in part] for name, part in old_split_examples(list(columns[-1]), ratios, seed=seed).items()}

    def old_cross(rows: dict[str, list[int]], sketches: object) -> tuple[int, int]:
        splits = {name: [columns[-1].example(i) for i in part] for name, part in rows.items()}
        return old_crossing(splits), sum(map(len, splits.values()))

    monkeypatch.setattr(export_module, "_kept_examples", kept)
    monkeypatch.setattr(export_module, "split_rows", old_split)
    monkeypatch.setattr(export_module, "cross_split_rows", old_cross)
    assert _export(dropped, tmp_path / "old") == stored
    assert "test.jsonl" in stored and "0 of " in stored


def test_export_imports_neither_datasketch_nor_pandas(grown: tuple[Path, int, list[int]], tmp_path: Path) -> None:
    db, run_id, _ = grown
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "appliance", "--db", str(db), "export", str(run_id),
                           "--out", str(tmp_path / "d.jsonl"), "--split", "train=0.9,test=0.1"],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "appliance" in imported and not imported & {"datasketch", "scipy", "pandas", "sqlite_utils", "jsonschema"}
