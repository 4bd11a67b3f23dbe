"""The everyday loop as a new user meets it: a re-run after `eval`, every command the tool prints for the
user (with `--db`) executed as printed, a quiet terminal, identical greedy requests giving identical
outputs, what the user asked for kept (system messages, max_tokens advice, no silent overwrite), numbers
and names that read right, and a browse server that refuses writes without a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from appliance.data.card import dataset_card
from appliance.data.examples import Example
from appliance.engine.engine import Engine
from appliance.engine.llama import count_prompt_tokens
from appliance.engine.types import Request, SamplingParams
from appliance.errors import ApplianceError
from appliance.models.gguf import read_gguf
from appliance.plan.hardware import detect_hardware
from appliance.plan.planner import make_plan
from appliance.prompts.files import parse_prompt
from appliance.recipes.recipe import load_recipe
from appliance.store import Store
from conftest import Cli

REPO = Path(__file__).resolve().parent.parent
QUOTED = re.compile(r"`([^`]+)`")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def _argv(command: str) -> list[str]:
    """A command the tool printed (`appliance ...`), as this environment runs it."""
    words = shlex.split(command)
    assert words[0] == "appliance", command
    return [sys.executable, "-m", "appliance", *words[1:]]


def _appliance(cwd: Path, *args: str, ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "appliance", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    if ok:
        assert result.returncode == 0, f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def _run_printed(cwd: Path, command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_argv(command), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"`{command}` as printed exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def _browse_starts(cwd: Path, command: str) -> None:
    """`appliance ... browse` as printed serves the database (then it is stopped)."""
    proc = subprocess.Popen(_argv(command) + ["--port", "0"], cwd=cwd, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving" in line and "read-only" in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _small_spec(folder: Path) -> Path:
    shutil.copytree(REPO / "tasks", folder / "tasks", dirs_exist_ok=True)
    path = folder / "tasks" / "smart-home.toml"
    path.write_text(path.read_text().replace("count = 40", "count = 16").replace("samples = 3", "samples = 1"))
    return path


def _interrupt_when_stored(cwd: Path, db: Path, args: list[str], rows: int = 2) -> str:
    """Start `appliance --db DB ARGS`, send Ctrl-C once the run it starts has `rows` outputs stored; its last
    stderr line."""
    def newest() -> tuple[int, int]:
        try:
            d = sqlite_utils.Database(db)
            run = d.execute("select coalesce(max(id), 0) from runs").fetchone()[0]
            return run, d.execute("select count(*) from generations where run_id = ?", [run]).fetchone()[0]
        except Exception:  # no database or schema yet
            return 0, 0

    before = newest()[0]
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "--db", str(db), *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        run, stored = newest()
        if run > before and stored >= rows:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------- the loop


def test_a_task_run_with_db_is_quiet_survives_eval_and_every_printed_command_runs(tmp_path, demo_model):
    spec = _small_spec(tmp_path)
    db = "cluster.db"  # not the default: every command printed must name it
    first = _appliance(tmp_path, "--db", db, "run", str(spec))
    printed = (first.stdout + first.stderr).splitlines()
    assert len(printed) <= 40, "\n".join(printed)  # a bar per stage and a summary; the outputs are in `logs`
    assert "--- item" not in first.stdout
    see = next(line for line in printed if "see the data:" in line)
    report, browse = (part.strip() for part in see.split("see the data:", 1)[1].split("|"))
    assert report.startswith(f"appliance --db {db} report ") and browse == f"appliance --db {db} browse"
    _run_printed(tmp_path, report)
    page = next(tmp_path.glob("run-*.html")).read_text()
    assert "input 5000" not in page and "#1," not in page  # items are numbered as `logs` numbers them
    _browse_starts(tmp_path, browse)

    # export: stored splits once; again only with --force
    _appliance(tmp_path, "--db", db, "export", "smart-home", "--out", "sh.jsonl")
    again = _appliance(tmp_path, "--db", db, "export", "smart-home", "--out", "sh.jsonl", ok=False)
    assert again.returncode == 1 and "exist" in again.stderr and "--force" in again.stderr
    _appliance(tmp_path, "--db", db, "export", "smart-home", "--out", "sh.jsonl", "--force")

    # eval numbers each task by its own examples; then the same spec again prints its summary
    evaluated = _appliance(tmp_path, "--db", db, "eval", str(demo_model), "--dataset", "smart-home")
    d = sqlite_utils.Database(tmp_path / db)
    per_task = {r["task"]: r["n"] for r in d.query(
        "select task, count(*) n from examples where kept = 1 and split = 'test' group by task")}
    for task, n in per_task.items():
        assert f"## {task} (" in evaluated.stdout and f", {n} examples)" in evaluated.stdout
    listed = _appliance(tmp_path, "--db", db, "evals").stdout
    for task, n in per_task.items():
        assert f"{task} (n={n})" in listed
    rerun = _appliance(tmp_path, "--db", db, "run", str(spec))
    assert "already complete" in rerun.stderr
    assert d.execute("select count(*) from predictions").fetchone()[0] > 0  # the eval's predictions stand


def test_ctrl_c_and_runs_print_commands_that_continue_the_run_with_its_db(tmp_path, demo_model):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    db = tmp_path / "other.db"
    last = _interrupt_when_stored(tmp_path, db, ["run", "recipes/synthetic-reviews.toml"], rows=3)
    resume = QUOTED.findall(last)[-1]
    assert resume.startswith(f"appliance --db {db} run recipes/synthetic-reviews.toml --resume "), last
    listed = _appliance(tmp_path, "--db", str(db), "runs").stdout
    assert f"resume with `{resume}`" in listed  # `runs` gives the same command
    done = _run_printed(tmp_path, resume)
    assert re.search(r"^run \d+ \(resumed\)", done.stderr, re.M), done.stderr

    last = _interrupt_when_stored(tmp_path, db, ["generate", "prompts/product-review.md", "-m", "gemma-3-270m-q4_k_m",
                                                 "-n", "64", "--max-tokens", "48"], rows=3)
    again = QUOTED.findall(last)[-1]
    assert again.startswith(f"appliance --db {db} generate prompts/product-review.md"), last
    _run_printed(tmp_path, again)


def test_the_readme_python_example_runs_twice_on_one_database(tmp_path, demo_model):
    for folder in ("prompts", "recipes"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    _small_spec(tmp_path)
    recipe = tmp_path / "recipes" / "synthetic-reviews.toml"
    recipe.write_text(recipe.read_text().replace("count = 24", "count = 6"))
    code = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)[0]
    (tmp_path / "example.py").write_text(code)
    for _ in range(2):
        result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                                timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "reviews kept" in result.stdout and "intent accuracy" in result.stdout


# ------------------------------------------------------------------------------------ reproducibility


def test_identical_greedy_requests_give_identical_outputs_at_every_parallelism(demo_model):
    prompt = "Question: Why is the sky blue?\nAnswer:"
    prefix, suffix = count_prompt_tokens(demo_model, [prompt])
    plan = make_plan(read_gguf(demo_model), detect_hardware(), n_parallel=6, prefix_tokens=prefix, seq_tokens=suffix + 32,
                     max_parallel=6).require()
    params = SamplingParams(temperature=0, max_tokens=32)
    with Engine(demo_model, plan) as engine:
        for n_parallel in (1, 2, 6):
            requests = [Request(key=i, prompt=prompt, seed=100 + i) for i in range(6)]
            out = {c.key: c for c in engine.generate(requests, params, n_parallel=n_parallel)}
            assert sorted(out) == list(range(6))
            assert len({c.text for c in out.values()}) == 1, [c.text for c in out.values()]
            assert [out[i].seed for i in range(6)] == [100 + i for i in range(6)]  # each keeps its own seed


def test_generate_at_temperature_0_stores_identical_outputs(run_cli, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")
    for parallel in ("1", "6"):
        run_cli("generate", "prompts/question.md", "-m", "smollm2-135m-instruct", "-n", "6", "--temperature", "0",
                "--max-tokens", "48", "--parallel", parallel, "--var", "question=Why is the sky blue?")
        run_id = max(r["id"] for r in run_cli.table("runs"))
        outputs = {g["output"] for g in run_cli.table("generations") if g["run_id"] == run_id}
        assert len(outputs) == 1, outputs


# ------------------------------------------------------------------------------- what the user asked for


def test_truncated_outputs_name_the_fix_in_the_summary(run_cli):
    shutil.copytree(REPO / "recipes", Path("recipes"))
    recipe = Path("recipes/synthetic-reviews.toml")
    text = re.sub(r"max_tokens = \d+", "max_tokens = 6", recipe.read_text()).replace("count = 24", "count = 3")
    recipe.write_text(text)
    result = run_cli("run", str(recipe), ok=False)
    assert "dropped by truncated" in result.stderr
    fix = next(line for line in result.stderr.splitlines() if line.strip().startswith("fix:"))
    assert "max_tokens = 6" in fix and "raise max_tokens" in fix and "tokens" in fix


def test_the_openai_export_starts_with_the_prompt_files_system_message(run_cli, smollm2_model):
    shutil.copytree(REPO / "recipes", Path("recipes"))
    recipe = Path("recipes/instruct-explanations.toml")
    text = "\n".join(line for line in recipe.read_text().splitlines() if not line.startswith("system ="))
    recipe.write_text(text.replace("count = 12", "count = 3"))
    assert "allow_truncated" not in text  # the shipped recipe keeps only answers that finished
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")
    run_cli("run", str(recipe))
    run_cli("export", "instruct-explanations", "--out", "explain.jsonl")
    system = parse_prompt(Path("prompts/explain.md").read_text(), "explain").header.system
    lines = [json.loads(line) for line in Path("explain.jsonl").read_text().splitlines()]
    assert lines and all(r["messages"][0] == {"role": "system", "content": system} for r in lines)


def test_a_turns_prompt_on_a_model_without_a_template_is_refused(run_cli):
    result = run_cli("generate", "prompts/explain.md", "-m", "gemma-3-270m-q4_k_m", "-n", "1", ok=False)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "written as chat turns" in line and "--chat-template" in line and "--mode completion" in line


def test_a_card_lists_a_label_that_kept_no_example():
    examples = [Example(id="1", instruction="turn it on", output="lights_on", label="intent:lights_on")]
    card = dataset_card("t", {"train": examples}, {}, "openai", labels=["intent:lights_on", "intent:lights_off"])
    assert "| intent:lights_off | 0 | 0 |" in card and "No example kept for intent:lights_off" in card


# ----------------------------------------------------------------------------------- names and numbers


def test_logs_show_what_each_output_was_made_for(run_cli):
    run_cli("generate", "prompts/product-review.md", "-m", "gemma-3-270m-q4_k_m", "-n", "1", "--max-tokens", "8",
            "--var", "product=a desk lamp")
    shown = run_cli("logs", "-n", "1").stdout
    assert "(for product=a desk lamp, tone=" in shown


def test_an_unknown_model_says_models_are_per_database_with_the_command_for_this_one(run_cli, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")  # in ./appliance.db
    other = Cli(Path("other.db").resolve())
    result = other("generate", "prompts/question.md", "-m", "smollm2-135m-instruct", "-n", "1", ok=False)
    line = result.stderr.strip().splitlines()[-1]
    assert "registered per database" in line and f"`appliance --db {other.db} models add PATH`" in line


def test_a_missing_database_names_the_command_with_its_db(run_cli):
    line = Cli(Path("none.db").resolve())("runs", ok=False).stderr.strip().splitlines()[-1]
    assert f"`appliance --db {Path('none.db').resolve()} generate PROMPT_FILE -m MODEL`" in line


def test_a_task_spec_with_a_toml_error_is_called_a_task_spec(run_cli):
    spec = Path("broken.toml")
    spec.write_text('name = "x"\n[[tasks]]\nname = "intent\n')
    line = run_cli("run", str(spec), ok=False).stderr.strip().splitlines()[-1]
    assert line.startswith("Error: task spec broken.toml: not valid TOML")


def test_a_quoted_number_is_refused_like_any_wrong_type(tmp_path):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    recipe = tmp_path / "recipes" / "synthetic-reviews.toml"
    recipe.write_text(recipe.read_text().replace("count = 24", 'count = "16"'))
    with pytest.raises(ApplianceError, match="key 'count': Input should be a valid integer"):
        load_recipe(recipe)


def test_a_prompt_header_typo_is_an_unknown_key():
    with pytest.raises(ApplianceError, match="header key 'temprature': unknown key"):
        parse_prompt("+++\ntemprature = 0.5\n+++\nQuestion: {{ q }}\nAnswer:", "p")


# --------------------------------------------------------------------------------------------- browse


def test_browse_refuses_writes_and_bad_queries_with_one_line_and_no_traceback(tmp_path, capfd):
    from appliance.views.browse import make_datasette

    Store(tmp_path / "a.db").close()
    ds = make_datasette(tmp_path / "a.db")

    async def calls() -> tuple[int, int, int]:
        post = await ds.client.post("/a/runs/-/insert", json={"row": {"kind": "x"}})
        bad = await ds.client.get("/a.json?sql=delete+from+runs")
        good = await ds.client.get("/a/runs.json")
        return post.status_code, bad.status_code, good.status_code

    assert asyncio.run(calls()) == (405, 400, 200)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("browse:")] == [
        "browse: POST /a/runs/-/insert: refused (405), the database is served read-only",
        "browse: GET /a.json: 400 DatasetteError: Statement must be a SELECT",
    ]
