"""Magpie on a real instruct model (SmolLM2-135M-Instruct, ChatML): the pre-query text cut out of the chat
template, requests the model writes itself, answers as a second turn with lineage, the export, the
refusals, and a run resumed after either stage was interrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlite_utils

from appliance.errors import ChatTemplateError
from appliance.prompts.chat import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template
from appliance.runs.items import ANSWER_BASE, ITEM_LIMIT
from appliance.runs.style import PromptStyle

REPO = Path(__file__).resolve().parent.parent
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture
def smol(run_cli, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", "smollm2-135m-instruct")
    return "smollm2-135m-instruct"


@pytest.fixture
def recipe(workdir) -> Path:
    """The shipped recipe, smaller: 4 items, short answers (kept even when cut off, so every item exports)."""
    shutil.copytree(REPO / "recipes", workdir / "recipes")
    path = workdir / "recipes" / "magpie-smollm2.toml"
    text = path.read_text().replace("count = 12", "count = 4").replace("max_tokens = 320", "max_tokens = 40")
    path.write_text(text.replace("[filters]\n", "[filters]\nallow_truncated = true\n").replace("min_words = 5", "min_words = 1"))
    return path


def test_pre_query_text_of_chatml_with_and_without_system(smollm2_model):
    style = PromptStyle("chat", load_chat_template(smollm2_model, None, "smol"), "smol")
    # no system message: SmolLM2's template writes its own default one, as in normal use
    pq = style.pre_query()
    assert pq.text == SMOL_SYSTEM + "<|im_start|>user\n"
    assert pq.add_bos is False  # the text starts with the BOS text (<|im_start|> for SmolLM2)
    assert pq.markers == ("<|im_end|>", "<|im_start|>") and pq.assistant_header == "assistant"
    assert style.pre_query("Be brief.").text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    plain = PromptStyle("chat", ChatTemplate(BUILTIN_TEMPLATES["chatml"], "builtin:chatml", bos_token="<s>"), "m")
    assert plain.pre_query().text == "<|im_start|>user\n" and plain.pre_query().add_bos is True
    # the request is cut at a marker spelled out as text, or at the assistant's header the model started
    assert pq.request(" How do I repot a fern?<|im_end|>\n<|im_start|>assistant\nSure") == "How do I repot a fern?"
    assert pq.request("How do I repot a fern?\nassistant\nFirst, water it.") == "How do I repot a fern?"
    assert pq.opens_answer("assistant\nSure, here you go") and not pq.opens_answer("What does an assistant do?")
    # a template that changes the user's content cannot be cut at it
    upper = ChatTemplate("{% for m in messages %}<|{{ m.role }}|>{{ m.content | upper }}{% endfor %}", "file:upper.jinja", "upper-model")
    with pytest.raises(ChatTemplateError, match="upper-model .* verbatim"):
        PromptStyle("chat", upper, "upper-model").pre_query()


def test_requests_and_answers_with_lineage_and_the_openai_export(run_cli, smol, recipe, workdir, smollm2_model):
    pq = PromptStyle("chat", load_chat_template(smollm2_model, None, "smol"), "smol").pre_query()
    res = run_cli("run", str(recipe))
    assert "run 1 (new): 4/4 generated" in res.output
    d = sqlite_utils.Database(run_cli.db)
    run = run_cli.table("runs")[0]
    assert run["kind"] == "synthetic" and run["mode"] == "chat" and run["status"] == "completed" and run["requested"] == 4
    gens = {g["item_index"]: g for g in run_cli.table("generations")}
    requests = {i % ITEM_LIMIT: g for i, g in sorted(gens.items()) if i < 3 * ITEM_LIMIT}  # the final attempt of each
    answers = {i - ANSWER_BASE: g for i, g in gens.items() if i >= ANSWER_BASE}
    assert sorted(requests) == [0, 1, 2, 3] and answers
    for item, g in requests.items():
        system = json.loads(g["messages_json"])[0]["content"]
        topic = json.loads(g["variables_json"])["topic"]  # the recipe's system template, rendered over the item's axes
        assert system == f"You are an expert in {topic}. Answer questions about {topic}."
        assert g["rendered_prompt"] == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"  # the raw pre-query text
        assert "<|im_end|>" not in g["output"] and "<|im_start|>" not in g["output"]
    ended = [g for g in requests.values() if g["finish_reason"] == "eos"]
    assert len(ended) >= 3, [g["output"] for g in requests.values()]  # the template's end-of-turn token ends the request
    examples = {e["generation_id"]: e for e in run_cli.table("examples")}
    for item, a in answers.items():
        req = requests[item]
        messages = json.loads(a["messages_json"])
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[1]["content"] == pq.request(req["output"])  # the request as the model wrote it, markers cut off
        assert a["rendered_prompt"].endswith(f"<|im_start|>user\n{messages[1]['content']}<|im_end|>\n<|im_start|>assistant\n")
        assert json.loads(a["variables_json"])["request_generation_id"] == req["id"]
        ex = examples[a["id"]]  # lineage: the example is made of the answer, which names its request
        assert ex["instruction"] == messages[1]["content"] and ex["output"] == a["output"].strip()
        assert ex["system"] == messages[0]["content"]
    verdicts = list(d.query("select filter, passed, reason from verdicts where filter = 'request'"))
    assert len(verdicts) == 4 and all(v["reason"] for v in verdicts)

    out = workdir / "magpie.jsonl"
    run_cli("export", "magpie-smollm2", "--format", "openai", "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) == sum(e["kept"] for e in examples.values())
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])

    again = run_cli("run", str(recipe))  # complete: nothing is generated again
    assert "already complete" in again.output and len(run_cli.table("generations")) == len(gens)


def test_resume_after_either_stage_was_interrupted_stores_nothing_twice(run_cli, smol, recipe):
    run_cli("run", str(recipe))
    d = sqlite_utils.Database(run_cli.db)
    first = {g["item_index"]: g["id"] for g in run_cli.table("generations")}
    answered = sorted(i for i in first if i >= ANSWER_BASE)
    assert len(answered) >= 2

    def interrupt(where: str) -> None:
        """What a kill leaves: the rows stored so far, no verdicts or examples yet, the run not completed."""
        d.execute("DELETE FROM examples")
        d.execute("DELETE FROM verdicts")
        d.execute(f"DELETE FROM generations WHERE {where}")
        d.execute("UPDATE runs SET status = 'interrupted'")
        d.conn.commit()

    interrupt(f"item_index IN ({answered[0]}, {answered[1]})")  # stage 2: two answers missing
    res = run_cli("run", str(recipe))
    assert "run 1 (resumed)" in res.output
    now = {g["item_index"]: g["id"] for g in run_cli.table("generations")}
    assert set(now) == set(first)
    assert all(now[i] == first[i] for i in first if i not in answered[:2])  # only the missing ones were made
    kept = len([e for e in run_cli.table("examples") if e["kept"]])

    interrupt(f"item_index >= {ANSWER_BASE} OR item_index IN (2, 3)")  # stage 1: two requests and every answer missing
    res = run_cli("run", str(recipe))
    assert "run 1 (resumed)" in res.output
    gens = run_cli.table("generations")
    indices = [g["item_index"] for g in gens]
    assert len(indices) == len(set(indices))  # nothing stored twice
    assert {0, 1, 2, 3} <= set(indices)
    assert len([i for i in indices if i >= ANSWER_BASE]) == len(list(d.query("select 1 from verdicts where filter = 'request' and passed = 1")))
    assert len(run_cli.table("runs")) == 1 and run_cli.table("runs")[0]["status"] == "completed"
    assert len(run_cli.table("examples")) == 4 and kept >= 1


def test_refused_in_one_line_for_a_base_model_and_for_completion_mode(run_cli, smol, recipe, demo_model, workdir):
    base = workdir / "base.toml"
    base.write_text(recipe.read_text().replace('model = "smollm2-135m-instruct"', f'model = "{demo_model}"'))
    res = run_cli("run", str(base), ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    line = res.output.strip()
    assert "\n" not in line and "has no chat template" in line and "Magpie needs an instruct model's template" in line
    assert "--chat-template" in line
    res = run_cli("run", str(recipe), "--mode", "completion", ok=False)
    assert res.exit_code == 1 and "needs chat mode" in res.output and len(res.output.strip().splitlines()) == 1
    bad = workdir / "bad.toml"
    bad.write_text(recipe.read_text().replace("{{ topic }}", "{{ subject }}"))
    res = run_cli("run", str(bad), ok=False)
    assert res.exit_code == 1 and "'subject'" in res.output and "[axes]" in res.output
    bad.write_text('prompt = "prompts/question.md"\n' + recipe.read_text())
    res = run_cli("run", str(bad), ok=False)
    assert res.exit_code == 1 and "writes its own requests" in res.output
    bad.write_text(recipe.read_text().replace("magpie = true\n", ""))
    res = run_cli("run", str(bad), ok=False)
    assert res.exit_code == 1 and "needs prompt" in res.output
    assert run_cli.table("runs") == []  # nothing was started
    # a template given for the base model makes it run (its requests are whatever a base model writes)
    base.write_text(base.read_text().replace("count = 4", "count = 2").replace("max_tokens = 40", "max_tokens = 12"))
    run_cli("run", str(base), "--chat-template", "gemma", ok=False)
    run = run_cli.table("runs")[0]
    assert run["status"] == "completed" and run["mode"] == "chat"
    first = run_cli.table("generations")[0]["rendered_prompt"]
    assert first.startswith("<bos><start_of_turn>user\nYou are an expert in ") and first.endswith(".\n\n")  # system merged


def test_request_verdicts(smollm2_model, recipe):
    from appliance.recipes.magpie import Magpie
    from appliance.recipes.recipe import load_recipe

    magpie = Magpie(load_recipe(recipe), PromptStyle("chat", load_chat_template(smollm2_model, None, "smol"), "smol"), None)

    def verdict(output: str, finish: str = "eos") -> tuple[str, bool, str]:
        request, v = magpie.request({"output": output, "finish_reason": finish})
        return request, v.passed, v.reason

    assert verdict(" How do I keep basil alive indoors?") == ("How do I keep basil alive indoors?", True, "a request of 7 words")
    assert verdict("assistant\nSure! Basil needs sun.")[1:] == (False, "the model opened the assistant's turn instead of writing a request")
    assert verdict("  \n")[1:] == (False, "the request is empty")
    assert verdict("How do I keep basil alive and", "length")[1:] == (False, "the request was cut off at max_tokens")
    assert verdict("Hello there")[1:] == (False, "the request has 2 words, fewer than 3")
    # a request the model ended by starting the assistant's turn is whole, even when the answer ran to the limit
    assert verdict("Why do basil leaves droop?\nassistant\nBecause", "length") == ("Why do basil leaves droop?", True, "a request of 5 words")


def test_a_judge_scores_magpie_examples_and_its_verdicts_are_kept(run_cli, smol, recipe):
    """`[judge]` applies to a magpie recipe as to any other: each answer that passed the filters is scored (a
    generation at JUDGE_BASE + the answer's index) and its `judge` verdict stored with the per-criterion detail."""
    from appliance.runs.items import JUDGE_BASE

    recipe.write_text(recipe.read_text() + '\n[judge]\nthreshold = 1.0\n[[judge.criteria]]\nname = "helpful"\n'
                      'description = "The answer addresses the request."\n')
    run_cli("run", str(recipe))
    gens = run_cli.table("generations")
    judged = [g for g in gens if g["item_index"] >= JUDGE_BASE]
    answers = {g["id"]: g for g in gens if ANSWER_BASE <= g["item_index"] < JUDGE_BASE}
    verdicts = [v for v in run_cli.table("verdicts") if v["filter"] == "judge"]
    assert judged and len(verdicts) == len(judged)
    for v in verdicts:
        assert v["generation_id"] in answers and 1 <= v["score"] <= 5 and v["passed"] == 1  # threshold 1: every score passes
        assert set(json.loads(v["detail_json"])) == {"helpful"}
    assert {g["item_index"] - JUDGE_BASE for g in judged} == {answers[v["generation_id"]]["item_index"] for v in verdicts}
    before = len(gens)
    assert "already complete" in run_cli("run", str(recipe)).output and len(run_cli.table("generations")) == before
