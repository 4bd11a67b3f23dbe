"""The rubric judge and preference pairs on the real test models (SmolLM2-135M-Instruct and the demo base model):
scores stored as verdicts with their detail, threshold drops, a judge on another model than the run's,
one-line errors for bad tables, DPO export loaded with HF datasets, SIGKILL and resume, the report's histogram."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from appliance.runs.items import ITEM_LIMIT, JUDGE_BASE

REPO = Path(__file__).resolve().parent.parent

JUDGE = """
[judge]
{extra}
[[judge.criteria]]
name = "accuracy"
description = "Every statement is true."

[[judge.criteria]]
name = "clarity"
description = "Easy to follow."
"""


def _recipe(folder: Path, name: str, *, kind: str = "synthetic", model: str = "smollm2-135m-instruct", count: int = 3,
            judge: str = "", extra: str = "", prompt: str = "explain.md", axes: str | None = None) -> Path:
    axes = axes or 'topic = ["why bread rises", "how a rainbow forms", "why the sea is salty"]\nreader = ["a child"]'
    path = folder / f"{name}.toml"
    path.write_text(f"""kind = "{kind}"
name = "{name}"
model = "{model}"
prompt = "prompts/{prompt}"
count = {count}
seed = 3
{extra}
[axes]
{axes}

[sampling]
max_tokens = 40

[filters]
allow_truncated = true
min_words = 1
near_duplicate_threshold = 0.95
{judge}
""")
    return path


@pytest.fixture
def smol(run_cli, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")
    return "smollm2-135m-instruct"


def _verdicts(run_cli, filter_name: str) -> list[dict]:
    return [v for v in run_cli.table("verdicts") if v["filter"] == filter_name]


def test_judge_scores_are_verdicts_and_the_threshold_drops(run_cli, smol, workdir):
    path = _recipe(workdir, "judged", judge=JUDGE.format(extra="threshold = 5.0"))
    res = run_cli("run", str(path), ok=False)  # a 135M judge rarely gives all 5s: most (maybe all) are dropped
    assert "Traceback" not in res.output
    judged = _verdicts(run_cli, "judge")
    gens = run_cli.table("generations")
    judge_gens = [g for g in gens if g["item_index"] >= JUDGE_BASE]
    assert len(judged) == len(judge_gens) == 3  # every output passed the mechanical filters, each scored once
    examples = {e["generation_id"]: e for e in run_cli.table("examples")}
    for v in judged:
        detail = json.loads(v["detail_json"])
        assert set(detail) == {"accuracy", "clarity"} and all(1 <= s <= 5 for s in detail.values())
        assert v["score"] == pytest.approx(sum(detail.values()) / 2)
        assert v["passed"] == (v["score"] >= 5.0)
        assert v["reason"].startswith(f"accuracy {detail['accuracy']}, clarity {detail['clarity']} (mean ")
        assert "\n" not in v["reason"]
        assert examples[v["generation_id"]]["kept"] == v["passed"]
    for g in judge_gens:  # the judge saw the rubric first and the text last, through SmolLM2's template
        assert g["rendered_prompt"].startswith("<|im_start|>") and "accuracy: Every statement is true." in g["rendered_prompt"]
        assert json.loads(g["variables_json"])["check"] == "judge"
    failed = sum(not v["passed"] for v in judged)
    assert failed > 0
    assert f"dropped by judge: {failed}" in res.output
    assert "judge: 3 scored" in res.output and "mean per criterion: accuracy" in res.output
    # a complete run run again judges nothing again
    again = run_cli("run", str(path), ok=False)
    assert "already complete" in again.output and len(run_cli.table("generations")) == len(gens)


def test_a_judge_on_another_model_is_loaded_after_the_main_stage(run_cli, smol, workdir, demo_model):
    """The demo base model writes (completion mode), SmolLM2 judges (chat mode): two loads, both recorded."""
    path = _recipe(workdir, "two-models", model=str(demo_model), prompt="product-review.md", count=3,
                   axes='product = ["a kettle", "a lamp", "a chair"]\ntone = ["enthusiastic"]',
                   judge=JUDGE.format(extra=f'model = "{smol}"\nthreshold = 1.0'))
    res = run_cli("run", str(path))
    assert "2 model loads" in res.output
    events = [e["message"] for e in run_cli.table("run_events")]
    assert any(m.startswith("switching model: gemma-3-270m") and m.endswith(f"-> {smol}") for m in events), events
    loads = [m for m in events if " loaded in " in m]
    assert len(loads) == 2 and loads[0].startswith("model gemma-3-270m") and loads[1].startswith(f"model {smol}")
    gens = run_cli.table("generations")
    main = [g for g in gens if g["item_index"] < ITEM_LIMIT]
    judged = [g for g in gens if g["item_index"] >= JUDGE_BASE]
    assert main and all(g["messages_json"] is None for g in main)  # the base model: completion
    assert judged and all(g["rendered_prompt"].startswith("<|im_start|>") for g in judged)  # SmolLM2's template
    assert len(_verdicts(run_cli, "judge")) == len(judged)


@pytest.mark.parametrize("judge, extra, kind, message", [
    ('[judge]\n[[judge.criteria]]\nname = "accuracy"\n', "", "synthetic", "key 'judge.criteria.0.description': is missing"),
    ('[judge]\ncriteria = []\n', "", "synthetic", "key 'judge.criteria'"),
    ('[judge]\n[[judge.criteria]]\nname = "a"\ndescription = "x"\n[[judge.criteria]]\nname = "a"\ndescription = "y"\n', "",
     "synthetic", "criteria named twice: a"),
    (JUDGE.format(extra=""), "min_margin = 5.0\nresponses = 2\n", "preference", "min_margin 5 is outside the judge's scale 1-5"),
    ("", "responses = 2\n", "preference", "a preference recipe needs a [judge] table"),
    (JUDGE.format(extra=""), "responses = 1\n", "preference", "key 'responses': Input should be greater than or equal to 2"),
    ("", "responses = 3\n", "synthetic", "responses: only preference recipes have these keys"),
    (JUDGE.format(extra="threshold = 7.0"), "", "synthetic", "threshold 7.0 is outside the scale 1-5"),
])
def test_bad_judge_and_preference_tables_are_one_line_errors(run_cli, workdir, judge, extra, kind, message):
    path = _recipe(workdir, "bad", kind=kind, judge=judge, extra=extra)
    res = run_cli("run", str(path), ok=False)
    assert res.exit_code == 1, res.output
    assert message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (workdir / "appliance.db").exists() or run_cli.table("runs") == []


PREFERENCE = {"kind": "preference", "count": 3, "extra": "responses = 2\ntemperatures = [0.2, 1.3]\nmin_margin = 0.5\n",
              "judge": JUDGE.format(extra="threshold = 2.0")}


def test_preference_pairs_export_as_dpo_that_datasets_loads(run_cli, smol, workdir):
    path = _recipe(workdir, "pairs", **PREFERENCE)
    res = run_cli("run", str(path), ok=False)
    examples = run_cli.table("examples")
    assert len(examples) == 3  # one per instruction, kept or not
    gens = {g["id"]: g for g in run_cli.table("generations")}
    responses = [g for g in gens.values() if g["item_index"] < JUDGE_BASE]
    assert sorted(g["item_index"] for g in responses) == [0, 1, 2, ITEM_LIMIT, ITEM_LIMIT + 1, ITEM_LIMIT + 2]
    scores = {v["generation_id"]: v["score"] for v in _verdicts(run_cli, "judge")}
    kept = [e for e in examples if e["kept"]]
    for e in examples:
        assert e["rejected_generation_id"] is None or e["rejected_generation_id"] != e["generation_id"]
        if e["kept"]:
            assert e["output"] != e["rejected"] and gens[e["rejected_generation_id"]]["output"].strip() == e["rejected"]
            assert scores[e["generation_id"]] - scores[e["rejected_generation_id"]] >= 0.5
            assert e["instruction"].startswith("Explain ")
    drops = {f for f in ("tie", "all_bad", "responses") if f"dropped by {f}" in res.output}
    assert len(kept) + sum(int(res.output.split(f"dropped by {f}: ")[1].split()[0]) for f in drops) == 3
    if not kept:
        pytest.skip(f"the judge kept no pair this time: {res.output}")
    out = workdir / "pairs.jsonl"
    run_cli("export", "pairs", "--format", "dpo", "--out", str(out))
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == len(kept)
    row = ds[0]
    assert [m["role"] for m in row["prompt"]][-1] == "user" and row["prompt"][-1]["content"].startswith("Explain ")
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    card = (workdir / "pairs.card.md").read_text()
    assert "## Judge scores" in card and "| accuracy |" in card
    # the report: a score histogram per criterion, its numbers in a table
    html = workdir / "r.html"
    run_cli("report", "pairs", "--out", str(html))
    page = html.read_text()
    assert 'aria-label="Judge scores per criterion: a plot; its numbers are in the table after it"' in page
    assert '<th scope="col">criterion</th>' in page and "<td>clarity</td>" in page


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def test_sigkill_during_a_preference_run_then_rerun_stores_nothing_twice(run_cli, smol, workdir):
    path = _recipe(workdir, "killed", **PREFERENCE)
    db = run_cli.db
    argv = [sys.executable, "-m", "appliance", "--db", str(db), "run", str(path), "--quiet"]
    proc = subprocess.Popen(argv, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if not db.exists():
            continue
        try:
            stored = sqlite_utils.Database(db).execute("select count(*) from generations").fetchone()[0]
        except sqlite3.Error:  # no schema yet
            stored = 0
        if stored >= 7:  # every response and at least one judge score
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sqlite_utils.Database(db).execute("select count(*) from generations").fetchone()[0]
    assert before >= 7
    final = subprocess.run(argv, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert "Traceback" not in final.stderr and "resumed" in final.stderr, final.stderr
    d = sqlite_utils.Database(db)
    gens = list(d.query("select item_index, item_key from generations"))
    assert len({g["item_key"] for g in gens}) == len(gens) == len({g["item_index"] for g in gens})
    responses = [g for g in gens if g["item_index"] < JUDGE_BASE]
    judged = [g for g in gens if g["item_index"] >= JUDGE_BASE]
    passed_filters = d.execute("select count(*) from verdicts where filter = 'judge'").fetchone()[0]
    assert len(responses) == 6 and len(judged) == passed_filters <= 6
    assert d["examples"].count == 3
    assert [r["status"] for r in d.query("select status from runs")] == ["completed"]


def test_a_task_spec_judge_scores_agreed_answers_before_balance(run_cli, workdir, demo_model):
    """The demo base model is teacher and judge (completion mode: the judge's JSON follows a blank line)."""
    import shutil

    shutil.copytree(REPO / "tasks", workdir / "tasks")
    path = workdir / "tasks" / "smart-home.toml"
    text = path.read_text().replace("count = 40", "count = 16").replace("samples = 3", "samples = 1")
    text = text.replace("[sampling.inputs]", JUDGE.format(extra="threshold = 2.0") + "\n[sampling.inputs]", 1)
    path.write_text(text.replace('model = "gemma-3-270m-q4_k_m"', f'model = "{demo_model}"'))
    res = run_cli("run", str(path), ok=False)
    assert "Traceback" not in res.output, res.output
    judged = _verdicts(run_cli, "judge")
    judge_gens = [g for g in run_cli.table("generations") if g["item_index"] >= JUDGE_BASE]
    assert judged and len(judged) == len(judge_gens)
    assert all(g["rendered_prompt"].startswith("You grade responses") and "\nInput: " in g["rendered_prompt"] for g in judge_gens)
    examples = {e["generation_id"]: e for e in run_cli.table("examples")}
    for v in judged:
        assert set(json.loads(v["detail_json"])) == {"accuracy", "clarity"}
        if not v["passed"]:
            assert examples[v["generation_id"]]["kept"] == 0
    assert "judge: " in res.output and "scored" in res.output
