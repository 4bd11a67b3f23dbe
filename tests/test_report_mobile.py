"""`appliance report` on a phone and at scale: every plot keeps its drawn size at 390x844 (its own box
scrolls, never the page) and carries its numbers as a table; a run of many thousand items, written
straight into a real store (no model), gives a page of bounded size that says it sampled."""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import tomllib
from test_see_the_data import assert_readable_on_a_phone, browser, phone_view  # noqa: F401 (browser: a fixture)

from appliance.store.database import Store
from appliance.views.plots import MARKERS, SEED
from appliance.views.report import write_report

REPO = Path(__file__).resolve().parent.parent
WORDS = ["turn", "the", "lights", "in", "kitchen", "on", "please", "and", "set", "heating", "to", "twenty", "at", "seven"]
INTENTS = ["lights_on", "lights_off", "set_temperature", "blinds_open", "blinds_close", "play_music"]


def make_large_run(db: Path, n: int, seed: int = 0) -> int:
    """A completed task run (the smart-home spec) of `n` inputs, each labelled for intent and slots: its
    generations, examples (task, label, split, agreement) and verdicts inserted in bulk; the run's id."""
    rng = random.Random(seed)
    spec = tomllib.loads((REPO / "tasks" / "smart-home.toml").read_text())
    store = Store(db)
    try:
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        run = store.start_run(kind="task", requested=n, config={"spec": spec, "spec_path": "tasks/smart-home.toml"},
                              started_at=start.isoformat())
        gens, examples, verdicts = [], [], []
        for i in range(n):
            task, label = ("intent", rng.choice(INTENTS)) if i % 2 == 0 else ("slots", None)
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18)))
            output = label or json.dumps({"room": "kitchen", "value": rng.randint(15, 25)})
            kept = rng.random() > 0.2
            at = (start + timedelta(seconds=i * 0.05)).isoformat(timespec="milliseconds")
            gens.append((i + 1, run, f"large-{run}-{i}", i, text, output, i, 20, 8, 40, "stop", at,
                         json.dumps({"input_index": i // 2})))
            split = rng.choice(["train", "train", "train", "validation", "test"]) if kept else None
            examples.append((run, i + 1, text, output, label, task, round(rng.choice([0.6, 0.8, 1.0]), 3),
                             split, int(kept), at))
            for f in ("valid", "agreement", "duplicate"):
                passed = kept or f != "agreement"
                verdicts.append((run, i + 1, f, int(passed), None, "ok" if passed else "agreement below the minimum"))
        with store.transaction() as conn:
            base = conn.execute("SELECT coalesce(max(id), 0) FROM generations").fetchone()[0]
            conn.executemany("INSERT INTO generations (id, run_id, item_key, item_index, rendered_prompt, output, seed, "
                             "tokens_in, tokens_out, ms, finish_reason, created_at, variables_json) "
                             "VALUES (?+?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [(base, *g) for g in gens])
            conn.executemany("INSERT INTO examples (run_id, generation_id, instruction, output, label, task, confidence, "
                             "split, kept, created_at) VALUES (?, ?+?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             [(e[0], base, *e[1:]) for e in examples])
            conn.executemany("INSERT INTO verdicts (run_id, generation_id, filter, passed, score, reason) "
                             "VALUES (?, ?+?, ?, ?, ?, ?)", [(v[0], base, *v[1:]) for v in verdicts])
        store.finish_run(run, "completed")
        return run
    finally:
        store.close()


def test_report_of_a_large_run_is_bounded_reproducible_and_says_it_sampled(tmp_path, browser):  # noqa: F811
    n = 20_000
    db, out, again = tmp_path / "large.db", tmp_path / "large.html", tmp_path / "again.html"
    run = make_large_run(db, n)
    store = Store(db)
    try:
        start = time.perf_counter()
        report = write_report(store, run, out)
        took = time.perf_counter() - start
        write_report(store, run, again)
    finally:
        store.close()
    html = out.read_text()
    assert len(html.encode()) < 2_000_000, len(html.encode())
    assert took < 30, took  # 100k items take about 3 s on 2 cores (docs/benchmarks.md)
    assert html.count("<use") < 3 * MARKERS  # two panels of at most MARKERS markers, and the speed plot's
    assert "random sample of" in html and f"of the {2 * n:,} lengths (seed {SEED}" in html  # input and output
    assert again.read_bytes() == out.read_bytes()  # the sample is seeded: the same page every time
    lengths = report.plots[0]
    counted = sum(int(row[3].replace(",", "")) for row in lengths.table[1] if row[0] == "input")
    assert lengths.title == "Length per label and split" and counted == n  # the table counts every value
    assert len(report.kept) <= 6 and len(report.dropped) <= 6
    assert_readable_on_a_phone(phone_view(browser, out), out)


def test_report_of_a_small_run_draws_every_value(tmp_path):
    n = 300
    db, out = tmp_path / "small.db", tmp_path / "small.html"
    run = make_large_run(db, n)
    store = Store(db)
    try:
        write_report(store, run, out)
    finally:
        store.close()
    html = out.read_text()
    assert "random sample" not in html and html.count("<use") >= 2 * n  # one marker per input and output length
