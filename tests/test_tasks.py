"""Task data for small models end to end on the demo model: spec -> inputs -> constrained labels ->
balanced, leak-free splits -> export -> student evaluation; and the bad inputs of eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlite_utils

from appliance.tasks.prompts import parse_output
from appliance.tasks.spec import load_task_spec

REPO = Path(__file__).resolve().parent.parent


def _small_spec(folder: Path) -> Path:
    shutil.copytree(REPO / "tasks", folder / "tasks", dirs_exist_ok=True)
    path = folder / "tasks" / "smart-home.toml"
    path.write_text(path.read_text().replace("count = 40", "count = 16"))
    return path


@pytest.fixture
def small_spec(workdir: Path) -> Path:
    return _small_spec(workdir)


@pytest.fixture(scope="module")
def task_db(tmp_path_factory, demo_model) -> tuple[Path, str]:
    """One real task run for the module (a few minutes on 2 cores): its database and what it printed."""
    from click.testing import CliRunner

    from appliance.cli import cli

    folder = tmp_path_factory.mktemp("taskrun")
    spec = _small_spec(folder)
    result = CliRunner().invoke(cli, ["--db", str(folder / "task.db"), "run", str(spec), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder / "task.db", result.stderr


@pytest.fixture
def task_run(run_cli, task_db):
    """This test's own copy of the task run's database."""
    db, stderr = task_db
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy(f"{db}{suffix}", f"{run_cli.db}{suffix}")
    return stderr


def test_spec_runs_end_to_end_with_balanced_parsable_leak_free_data(run_cli, small_spec, task_run):
    d = sqlite_utils.Database(run_cli.db)
    run = next(iter(d["runs"].rows))
    assert run["kind"] == "task" and run["status"] == "completed"
    spec = load_task_spec(small_spec).spec
    kept = list(d.query("select * from examples where kept = 1"))
    assert kept
    # every kept output parses under its task's constraints, and is stored in its canonical form
    for ex in kept:
        task = spec.task(ex["task"])
        assert parse_output(task, ex["output"]) == ex["output"]
        assert ex["split"] in {"train", "validation", "test"}
        assert 0 < ex["confidence"] <= 1
    # balance: no label above its target's upper bound; every label short of its lower bound is reported
    from appliance.tasks.spec import label_targets, task_targets

    targets = task_targets(spec)
    events = " ".join(e["message"] for e in d["run_events"].rows)
    for task in spec.tasks:
        if task.kind == "classify":
            for label, goal in label_targets(task, targets[task.name]).items():
                n = sum(1 for ex in kept if ex["task"] == task.name and ex["label"] == label)
                low, high = spec.balance.bounds(goal)
                assert n <= high, (label, n, goal)
                if n < low:
                    assert f"{task.name}/{label}: {n} of {goal}" in events
        else:
            n = sum(1 for ex in kept if ex["task"] == task.name)
            assert n <= spec.balance.bounds(targets[task.name])[1]
    # no input text in two splits, and none copied from the prompt's few-shot examples
    by_text: dict[str, set[str]] = {}
    for ex in kept:
        by_text.setdefault(ex["instruction"].lower(), set()).add(ex["split"])
    assert all(len(s) == 1 for s in by_text.values())
    shots = {e.lower() for t in spec.tasks for e in t.example_inputs()}
    assert not shots & set(by_text)
    # each kept example keeps its self-consistency votes as generations
    verdicts = {v["filter"] for v in d["verdicts"].rows}
    assert {"valid", "agreement"} <= verdicts
    assert "task/label" in task_run and "kept / target" in task_run


def test_export_with_task_system_prompts_and_card(run_cli, task_run):
    run_cli("export", "1", "--format", "openai", "--out", "sh.jsonl")
    rows = [json.loads(line) for split in ("train", "validation", "test") for line in Path(f"sh.{split}.jsonl").read_text().splitlines()]
    systems = {r["messages"][0]["content"] for r in rows}
    assert any("Classify" in s for s in systems) and any("Extract" in s for s in systems)
    card = Path("sh.card.md").read_text()
    assert "## Labels" in card and "as stored by run 1 (train=0.7,validation=0.1,test=0.2)" in card


def test_export_as_the_readme_says_trains_on_no_stored_test_item(run_cli, task_run):
    """Issue 13: `export --split` re-split a task run with its own seed, so items `eval` tests on were in
    the training file. Now the stored splits are exported, and a differing --split is refused."""
    d = sqlite_utils.Database(run_cli.db)
    stored = {s: {r["instruction"] for r in d.query("select instruction from examples where kept = 1 and split = ?", [s])}
              for s in ("train", "validation", "test")}
    assert stored["test"]
    r = run_cli("export", "1", "--format", "alpaca", "--out", "t.jsonl", "--split", "train=0.8,test=0.2", ok=False)
    assert r.exit_code == 1 and "run 1 stored its splits (train=0.7,validation=0.1,test=0.2" in r.stderr
    run_cli("export", "1", "--format", "alpaca", "--out", "t.jsonl")
    for split, texts in stored.items():
        assert {json.loads(line)["instruction"] for line in Path(f"t.{split}.jsonl").read_text().splitlines()} == texts
    train = {json.loads(line)["instruction"] for line in Path("t.train.jsonl").read_text().splitlines()}
    assert not train & stored["test"]


def test_eval_scores_the_student_and_stores_every_prediction(run_cli, task_run, demo_model):
    d = sqlite_utils.Database(run_cli.db)
    n_test = d.execute("select count(*) from examples where kept = 1 and split = 'test'").fetchone()[0]
    assert n_test > 0  # every split gets a cluster once there are as many as splits: a test split that can be scored
    result = run_cli("eval", str(demo_model), "--dataset", "1", "--json")
    report = json.loads(result.stdout)
    assert report["n"] == n_test
    evals = list(d["evals"].rows)
    assert len(evals) == 1 and json.loads(evals[0]["metrics_json"]) == report["tasks"]
    preds = list(d["predictions"].rows)
    assert len(preds) == n_test
    for task, metrics in report["tasks"].items():
        mine = [p for p in preds if p["task"] == task]
        if "accuracy" in metrics:
            assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))
        if "json_valid" in metrics:
            assert metrics["json_valid"] == pytest.approx(sum(p["valid"] for p in mine) / len(mine))
    assert "smart-home/test" in run_cli("evals").stdout


def test_eval_bad_inputs(run_cli, workdir, demo_model, small_spec):
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "1", "--max-tokens", "4")
    r = run_cli("eval", str(demo_model), "--dataset", "1", ok=False)
    assert r.exit_code == 1 and "is a generate run; eval needs a task run" in r.stderr
    r = run_cli("eval", str(demo_model), "--dataset", "99", ok=False)
    assert r.exit_code == 1 and "no run 99" in r.stderr


def test_eval_refuses_a_missing_split_and_a_student_whose_context_is_too_small(run_cli, task_run, workdir, demo_model):
    r = run_cli("eval", str(demo_model), "--dataset", "1", "--split", "holdout", ok=False)
    assert r.exit_code == 1 and "no 'holdout' split" in r.stderr
    # a copy of the demo model that claims a 64-token trained context
    import gguf

    small = workdir / "tiny-context.gguf"
    shutil.copy(demo_model, small)
    reader = gguf.GGUFReader(small, "r+")
    field = reader.fields["gemma3.context_length"]
    field.parts[field.data[0]][0] = 64
    del reader
    before = sqlite_utils.Database(run_cli.db)["runs"].count
    r = run_cli("eval", str(small), "--dataset", "1", "--split", "train", ok=False)
    assert r.exit_code == 1 and "trained for 64" in r.stderr and "\n" not in r.stderr.strip()
    assert sqlite_utils.Database(run_cli.db)["runs"].count == before
