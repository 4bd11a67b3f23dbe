"""The newcomer's path (issue 14): every hint names the exact next command, every count reads right,
`plan` says what it changed, a closed pipe ends quietly, and models are found and named as documented.

Listings are checked on runs written straight into a real SQLite file (a task run of 300 generations
would take minutes to make); everything that generates uses the real demo model.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


from appliance.recipes.judge import INSTRUCTION_ENV
from appliance.errors import RunInterrupted, with_article
from appliance.recipes.recipe import load_recipe
from appliance.store.database import Store, utcnow

REPO = Path(__file__).resolve().parent.parent


def fake_run(store: Store, *, kind: str, requested: int, generations: list[dict[str, Any]] | None = None,
             kept: int = 0, name: str | None = None, status: str = "completed", config: dict | None = None) -> int:
    """A run with these generations (item_index and variables) and `kept` kept examples, as the code writes them."""
    run_id = store.start_run(kind=kind, name=name, requested=requested, status=status, config=config or {})
    for n, g in enumerate(generations or []):
        gen_id = store.insert("generations", {
            "run_id": run_id, "item_key": f"{run_id}:{n}", "item_index": g["item_index"], "rendered_prompt": "Q:",
            "output": g.get("output", f"output {n}"), "seed": n, "tokens_in": 3, "tokens_out": 2, "ms": 5,
            "finish_reason": "stop", "created_at": utcnow(),
            "variables_json": json.dumps(g["variables"]) if g.get("variables") else None,
        })
        if n < kept:
            store.insert("examples", {"run_id": run_id, "generation_id": gen_id, "instruction": f"do {n}", "output": f"done {n}",
                                      "group_key": f"item:{n}", "kept": 1, "created_at": utcnow()})
    return run_id


def task_generations(n_inputs: int, samples: int) -> list[dict[str, Any]]:
    """Generations laid out as a task run stores them: inputs from 0, answers from 500000 (input x 20 + k)."""
    gens = [{"item_index": i, "variables": {"phase": "input", "round": 0, "task": "intent", "label": "lights_on"}}
            for i in range(n_inputs)]
    gens += [{"item_index": 500_000 + i * 20 + k,
              "variables": {"phase": "output", "round": 0, "task": "intent", "input_index": i, "sample": k}}
             for i in range(n_inputs) for k in range(samples)]
    return gens


def shrink_recipe(workdir: Path, count: int = 2) -> Path:
    shutil.copytree(REPO / "recipes", workdir / "recipes", dirs_exist_ok=True)
    path = workdir / "recipes" / "synthetic-reviews.toml"
    path.write_text(path.read_text().replace("count = 24", f"count = {count}").replace("max_tokens = 64", "max_tokens = 12"))
    return path


# ------------------------------------------------------------------------------------ 1. resume hints


def test_an_interrupted_recipe_run_names_the_command_that_continues_it(run_cli, workdir, monkeypatch):
    recipe = shrink_recipe(workdir, count=3)
    seen = []

    def stop_after_the_first(self, row: dict) -> None:
        seen.append(row)
        raise KeyboardInterrupt  # Ctrl-C right after the first output is stored

    from appliance.views.progress import GenerationProgress

    with monkeypatch.context() as m:
        m.setattr(GenerationProgress, "row", stop_after_the_first)
        result = run_cli("run", "recipes/synthetic-reviews.toml", "--parallel", "1", ok=False)
    assert result.exit_code == 130
    command = "appliance run recipes/synthetic-reviews.toml --resume 1"
    assert result.stderr.strip() == (
        f"Error: interrupted: run 1 keeps 1 output stored so far; resume with `{command}`")
    listed = run_cli("runs").stdout
    assert f"resume with `{command}`" in listed
    assert json.loads(run_cli("runs", "--json").stdout.splitlines()[0])["next"] == f"resume with `{command}`"
    # the hint is a command that works as printed
    resumed = run_cli(*shlex.split(command)[1:], "--quiet", ok=False)  # 12 tokens: its outputs may all be cut off
    assert "run 1 (resumed): 3/3 generated" in resumed.stderr
    assert recipe.exists() and "resume" not in run_cli("runs").stdout


def test_an_interrupted_generate_run_says_it_cannot_be_resumed_and_what_to_run(run_cli, demo_model, monkeypatch):
    args = ["generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "3", "--max-tokens", "6", "--parallel", "1"]

    def stop(self, row: dict) -> None:
        raise KeyboardInterrupt

    from appliance.views.progress import GenerationProgress

    with monkeypatch.context() as m:
        m.setattr(sys, "argv", ["appliance", *args])  # what the command line was
        m.setattr(GenerationProgress, "row", stop)
        result = run_cli(*args, ok=False)
    again = f"`appliance {shlex.join(args)}`"
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        f"Error: interrupted: run 1 keeps 1 output stored so far; a generate run cannot be resumed: run {again} again "
        "(a new run; run 1 keeps what it stored)")
    assert f"a generate run cannot be resumed: run {again} again" in run_cli("runs").stdout
    assert "resume with `appliance run" not in run_cli("runs").stdout


def test_runs_gives_each_unfinished_kind_its_own_next_step(run_cli):
    store = Store(run_cli.db)
    fake_run(store, kind="task", requested=40, status="running", name="smart-home",
             config={"spec_path": "tasks/my home.toml", "spec": {}})
    fake_run(store, kind="eval", requested=7, status="failed", config={"student": "tiny", "dataset_run": 1, "split": "test"})
    fake_run(store, kind="synthetic", requested=4, status="completed", config={"recipe_path": "recipes/x.toml"})
    rows = {r["id"]: r for r in map(json.loads, run_cli("runs", "--json").stdout.splitlines())}
    assert rows[1]["next"] == "resume with `appliance run 'tasks/my home.toml' --resume 1`"
    assert rows[2]["next"] == "an eval run cannot be resumed: run `appliance eval tiny --dataset 1 --split test` again (a new run)"
    assert rows[3]["next"] is None


def test_resuming_a_generate_run_as_a_recipe_is_refused_in_plain_words(run_cli, workdir):
    shrink_recipe(workdir)
    fake_run(Store(run_cli.db), kind="generate", requested=2, status="interrupted")
    result = run_cli("run", "recipes/synthetic-reviews.toml", "--resume", "1", ok=False)
    assert "Error: run 1 is a generate run, not a recipe run" in result.stderr


# ---------------------------------------------------------------------------- 2. runs named, not numbered


def test_a_run_is_named_by_id_last_or_its_name(run_cli, workdir):
    from appliance.runs.queries import resolve_run

    store = Store(run_cli.db)
    first = fake_run(store, kind="synthetic", requested=1, name="reviews")
    fake_run(store, kind="generate", requested=1)
    newest = fake_run(store, kind="synthetic", requested=1, name="reviews")
    assert resolve_run(store, str(first)) == first
    assert resolve_run(store, "last") == newest
    assert resolve_run(store, "reviews") == newest  # a name stands for its newest run
    result = run_cli("export", "nosuchname", "--out", "x.jsonl", ok=False)
    assert result.stderr.strip() == (
        "Error: no run 'nosuchname': give a run id, `last` or a run name (see `appliance runs`); run names: reviews")
    assert "no run 'x'" in run_cli("eval", "DEMO", "--dataset", "x", ok=False).stderr
    assert "no run 99" in run_cli("logs", "--run", "99", ok=False).stderr


# ---------------------------------------------------------------------------- 3. one file, one name


def test_registering_a_known_file_under_a_new_name_is_refused(run_cli, demo_model, workdir):
    local = workdir / "tiny.gguf"
    os.link(demo_model, local) if os.stat(demo_model).st_dev == os.stat(workdir).st_dev else shutil.copy(demo_model, local)
    run_cli("models", "add", str(local))
    result = run_cli("models", "add", str(local), "--name", "other", ok=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{local} is already registered as 'tiny'" in lines[0] and "models remove tiny" in lines[0]
    names = {json.loads(line)["name"] for line in run_cli("models", "list", "--json").stdout.splitlines()}
    assert "tiny" in names and "other" not in names
    run_cli("models", "add", str(local))  # the same name again is fine
    run_cli("models", "remove", "tiny")
    assert "added other" in run_cli("models", "add", str(local), "--name", "other").stdout  # the documented way to rename


# --------------------------------------------------------------------------- 4. plan says what it changed


def _plan(run_cli, *args: str) -> tuple[dict[str, Any], str]:
    as_json = json.loads(run_cli("plan", "gemma-3-270m-q4_k_m", *args, "--json", ok=False).stdout)
    return as_json, run_cli("plan", "gemma-3-270m-q4_k_m", *args, ok=False).stdout


def test_plan_keeps_the_context_within_what_the_model_was_trained_for(run_cli, demo_model):
    plan, text = _plan(run_cli, "--ctx", "100000")
    assert plan["n_ctx"] == 32768 and "ctx 32768" in text
    assert plan["adjustments"] == [
        "ctx 100000 -> 32768: the model was trained for 32768 tokens "
        "(--allow-long-context keeps 100000, at the risk of repetition or nonsense past 32768 tokens)"]
    assert "changed      ctx 100000 -> 32768" in text
    plan, text = _plan(run_cli, "--ctx", "100000", "--allow-long-context")
    assert plan["n_ctx"] == 100096
    assert "expect repetition or nonsense beyond 32768 tokens" in text and "ctx 100000 -> 100096" in text


def test_plan_reports_every_value_it_changes(run_cli, demo_model):
    plan, text = _plan(run_cli, "--parallel", "100000", "--gpu-layers", "5", "--ctx", "1")
    assert (plan["n_parallel"], plan["n_gpu_layers"], plan["n_ctx"]) == (255, 0, 256)
    changed = [line.removeprefix("changed      ") for line in text.splitlines() if line.startswith("changed")]
    assert [c.split(":")[0] for c in changed] == ["ctx 1 -> 256", "parallel 100000 -> 255", "gpu layers 5 -> 0"]
    assert changed == plan["adjustments"]
    plan, text = _plan(run_cli, "--ctx", "4096", "--parallel", "4")
    assert plan["adjustments"] == [] and "changed" not in text


def test_plan_adjustments_for_gpu_layers_and_suggestions_within_the_trained_context():
    from test_planner import machine, mistral_7b_q4_k_m

    from appliance.plan.hardware import GPUInfo
    from appliance.plan.planner import make_plan

    gpu = GPUInfo(index=0, name="test", backend="cuda", vram_total_bytes=80 << 30, vram_free_bytes=80 << 30)
    plan = make_plan(mistral_7b_q4_k_m(), machine(64, [gpu]), n_gpu_layers=50)
    assert plan.n_gpu_layers == 33
    assert plan.adjustments == ["gpu layers 50 -> 33: the model has 32 layers plus the output layer"]
    small = make_plan(mistral_7b_q4_k_m(), machine(6), n_ctx=1_000_000)
    assert small.n_ctx == 32768 and small.adjustments[0].startswith("ctx 1000000 -> 32768")
    ctx = [int(m) for s in small.suggestions for m in re.findall(r"--ctx (\d+)", s)]
    assert all(c <= 32768 for c in ctx)


# ---------------------------------------------------------------------------------- 5. a closed pipe


def test_a_closed_pipe_ends_quietly(workdir):
    db = workdir / "big.db"
    store = Store(db)
    fake_run(store, kind="generate", requested=600,
             generations=[{"item_index": i, "output": "word " * 60} for i in range(600)])  # ~300 KiB of JSON: more than a pipe holds
    store.close()
    env = {**os.environ, "APPLIANCE_DB": str(db), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for args in (["logs", "-n", "0", "--json"], ["logs", "-n", "0"]):
        proc = subprocess.Popen([sys.executable, "-m", "appliance", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout.readline()
        proc.stdout.close()  # `| head -1`
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141
        assert err == ""


# --------------------------------------------------------------------------------- 6. counts that read right


def test_runs_and_db_check_count_each_kind_in_its_own_units(run_cli):
    store = Store(run_cli.db)
    fake_run(store, kind="task", requested=40, generations=task_generations(4, 3), kept=3, name="smart-home", status="running",
             config={"spec_path": "tasks/smart-home.toml"})
    fake_run(store, kind="eval", requested=7, generations=[{"item_index": i} for i in range(7)], name="eval of x")
    fake_run(store, kind="synthetic", requested=5, generations=[{"item_index": i} for i in range(5)], kept=4, name="reviews")
    fake_run(store, kind="generate", requested=3, generations=[{"item_index": i} for i in range(2)], status="interrupted")
    runs = run_cli("runs").stdout
    assert "16 generations, 3/40 examples kept  smart-home" in runs and "16/40" not in runs
    assert "7/7 predictions  eval of x" in runs and "kept" not in runs.split("predictions")[1].splitlines()[0]
    assert "5/5 generated, 4 kept  reviews" in runs
    assert "2/3 outputs" in runs
    check = run_cli("db", "check").stdout
    assert "run    1     task      running     16 generations, 3/40 examples kept" in check
    assert "run    2     eval      completed   7/7 predictions" in check


def test_logs_number_items_as_json_does_and_describe_task_items(run_cli):
    store = Store(run_cli.db)
    fake_run(store, kind="generate", requested=2, generations=[{"item_index": 0}, {"item_index": 1}])
    fake_run(store, kind="task", requested=4, generations=task_generations(1, 1), name="smart-home")
    rows = [json.loads(line) for line in run_cli("logs", "-n", "0", "--json").stdout.splitlines()]
    text = [line for line in run_cli("logs", "-n", "0").stdout.splitlines() if line.startswith("## ")]
    assert [int(re.search(r" item (\d+)", t).group(1)) for t in text] == [r["item_index"] for r in rows]
    assert text[0].startswith("## run 2 item 500000 (intent answer 0 to item 0)")
    assert text[1].startswith("## run 2 item 0 (intent input, round 0, label lights_on)")
    assert text[-1].startswith("## run 1 item 0  ")
    assert not any("None" in t or "#" in t.removeprefix("## ") for t in text)


def test_resumed_only_when_something_was_resumed(run_cli, workdir):
    shrink_recipe(workdir, count=2)
    first = run_cli("run", "recipes/synthetic-reviews.toml", "--quiet", ok=False).stderr  # may keep nothing at 12 tokens
    assert "run 1 (new)" in first
    again = run_cli("run", "recipes/synthetic-reviews.toml", "--quiet", ok=False).stderr
    assert "run 1 (already complete; --new-run starts another)" in again and "resumed" not in again


def test_articles_read_right(run_cli, workdir):
    assert [with_article(w) for w in ("eval", "generate", "augmented", "task spec", "recipe")] == [
        "an eval", "a generate", "an augmented", "a task spec", "a recipe"]
    fake_run(Store(run_cli.db), kind="eval", requested=1)
    assert "run 1 is an eval run with no dataset examples" in run_cli("export", "1", "--out", "x.jsonl", ok=False).stderr
    for path in sorted((REPO / "recipes").glob("*.toml")):
        recipe = load_recipe(path).recipe
        if not recipe.instruction:
            continue
        axes = sorted(recipe.axes.items())
        for combo in itertools.product(*(values for _, values in axes)):
            text = INSTRUCTION_ENV.from_string(recipe.instruction).render(**dict(zip((k for k, _ in axes), combo)))
            assert not re.search(r"\ba [aeiou]", text, re.I), f"{path.name}: {text}"


# ------------------------------------------------------------------------------ 8. symlinks under ./models/


def test_symlinks_under_models_are_found_by_their_own_names(run_cli, demo_model, workdir):
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(demo_model, elsewhere / "Some-Model.Q4_K_M.gguf")
    (workdir / "models").mkdir()
    (workdir / "models" / "mine.gguf").symlink_to(elsewhere / "Some-Model.Q4_K_M.gguf")  # a link to a new file
    (workdir / "models" / "demo-link.gguf").symlink_to(demo_model)  # a link to a file registered already
    (workdir / "models" / "shelf").symlink_to(elsewhere)  # a linked folder
    (workdir / "models" / "loop").symlink_to(workdir / "models")  # a cycle must not hang discovery
    listed = {m["name"]: m for m in map(json.loads, run_cli("models", "list", "--json").stdout.splitlines())}
    assert {"mine", "demo-link", "Some-Model.Q4_K_M", "gemma-3-270m-q4_k_m"} <= set(listed)
    assert listed["mine"]["path"] == str(workdir.resolve() / "models" / "mine.gguf")
    assert all(m["origin"] == "discovered" for name, m in listed.items() if name != "gemma-3-270m-q4_k_m")
    assert run_cli("models", "inspect", "mine", "--json").stdout


def test_interrupted_is_still_a_keyboard_interrupt():
    """Code that cleans up on Ctrl-C (`except KeyboardInterrupt`) still sees a stopped run."""
    assert issubclass(RunInterrupted, KeyboardInterrupt)
