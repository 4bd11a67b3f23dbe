"""Conversation recipes on the real test models: SmolLM2-135M-Instruct in chat mode and the demo base model
in completion mode, turn by turn, exported as multi-turn OpenAI/ShareGPT files that HF `datasets` loads;
drop vs cut; bad input; SIGKILL mid-run then the same command; the card and summary count turns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from appliance.data.filters import Verdict
from appliance.recipes.conversation import Conversation, check_turn, clean_turn, judge_conversations, position, progress
from appliance.recipes.recipe import load_recipe
from appliance.prompts.files import load_prompt
from appliance.runs.items import ITEM_LIMIT

REPO = Path(__file__).resolve().parent.parent
APPLIANCE = str(Path(sys.executable).with_name("appliance"))
SMOL = "smollm2-135m-instruct"
# small and lenient: every turn is short and most pass, so there is something to export
LENIENT = "[filters]\nmin_words = 1\nallow_truncated = true\ngrounding_min_score = 0.05\necho_max_shared_run = 400\necho_max_ngram_overlap = 1.0\n"


@pytest.fixture
def recipes(workdir: Path) -> Path:
    shutil.copytree(REPO / "recipes", workdir / "recipes")
    return workdir / "recipes"


def variant(recipes: Path, name: str, filters: str | None = None, **keys: str) -> Path:
    """A copy of the shipped conversation recipe: top-level keys replaced (or added), [filters] replaced."""
    lines = (recipes / "conversation-coriolanus.toml").read_text().splitlines()
    if filters is not None:
        lines = lines[: lines.index("[filters]")]
    out, given = [], dict(keys, name=f'"{name}"')
    for line in lines:
        key = line.split(" = ", 1)[0]
        out.append(f"{key} = {given.pop(key)}" if key in given and " = " in line else line)
    first_table = next(i for i, line in enumerate(out) if line.startswith("["))
    out[first_table:first_table] = [f"{k} = {v}" for k, v in given.items()]
    path = recipes / f"{name}.toml"
    path.write_text("\n".join(out) + "\n" + (filters or ""))
    return path


def by_conversation(gens: list[dict]) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = {}
    for g in gens:
        i, p = position(g["item_index"])
        out.setdefault(i, {})[p] = g
    return out


def assert_turn_by_turn(d: sqlite_utils.Database, turns: int) -> None:
    """Each conversation's turns are stored once, from the first on with no gap, and a conversation goes on
    after a turn only when every verdict on that turn passed."""
    gens = list(d.query("select id, item_index, item_key from generations"))
    assert len({g["item_key"] for g in gens}) == len(gens) == len({g["item_index"] for g in gens})
    failed = {v["generation_id"] for v in d.query("select generation_id from verdicts where passed = 0")}
    judged = {v["generation_id"] for v in d.query("select generation_id from verdicts")}
    for positions in by_conversation(gens).values():
        assert sorted(positions) == list(range(len(positions))) and len(positions) <= 2 * turns
        for p in sorted(positions)[:-1]:
            assert positions[p]["id"] not in failed
        assert {g["id"] for g in positions.values()} <= judged  # every turn has its verdicts
        if len(positions) < 2 * turns:
            assert positions[max(positions)]["id"] in failed  # it stopped because that turn failed


def test_chat_mode_on_smollm2_exports_multi_turn_files_that_datasets_loads(run_cli, recipes, smollm2_model):
    datasets = pytest.importorskip("datasets")
    run_cli("models", "add", str(smollm2_model), "--name", SMOL)
    recipe = variant(recipes, "conv-chat", count="3", filters=LENIENT)
    result = run_cli("run", str(recipe))
    assert "3/3 generated" in result.stderr and "conversations: 3 started" in result.stderr, result.stderr
    d = sqlite_utils.Database(run_cli.db)
    run = list(d["runs"].rows)[0]
    assert run["kind"] == "conversation" and run["mode"] == "chat" and run["status"] == "completed"
    assert_turn_by_turn(d, 2)
    gens = {g["item_index"]: g for g in d["generations"].rows}
    first_answer = json.loads(gens[ITEM_LIMIT]["messages_json"])
    assert [m["role"] for m in first_answer] == ["system", "user"]
    assert "Passage:" in first_answer[0]["content"] and first_answer[1]["content"] == clean_turn(gens[0]["output"])
    if 2 * ITEM_LIMIT in gens:  # the user's second message sees the conversation so far
        follow_up = json.loads(gens[2 * ITEM_LIMIT]["messages_json"])
        assert "so far:\nUser: " in follow_up[-1]["content"] and "Assistant: " in follow_up[-1]["content"]
        assert json.loads(gens[2 * ITEM_LIMIT]["variables_json"])["turn"] == 2
    assert all("<|im_" not in g["output"] for g in gens.values())
    kept = [e for e in d["examples"].rows if e["kept"]]
    assert kept, "lenient filters should keep a conversation"
    for e in kept:
        messages = json.loads(e["messages_json"])
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert e["instruction"] == messages[0]["content"] and e["output"] == messages[-1]["content"]
        assert e["system"].startswith("You answer questions about the passage") and e["group_key"].startswith("chunk:")
    run_cli("export", "conv-chat", "--format", "openai", "--out", "conv.jsonl")
    run_cli("export", "conv-chat", "--format", "sharegpt", "--out", "share.jsonl")
    openai = datasets.load_dataset("json", data_files="conv.jsonl", split="train")
    assert openai.column_names == ["messages"] and len(openai) == len(kept)
    assert [m["role"] for m in openai[0]["messages"]][:3] == ["system", "user", "assistant"]
    share = datasets.load_dataset("json", data_files="share.jsonl", split="train")
    assert share.column_names == ["conversations"] and [m["from"] for m in share[0]["conversations"]][:3] == ["system", "human", "gpt"]
    card = Path("conv.card.md").read_text()
    turns = {}
    for e in kept:
        n = len(json.loads(e["messages_json"])) // 2
        turns[n] = turns.get(n, 0) + 1
    assert "## Turns" in card and all(f"| {k} | {n} |" in card for k, n in turns.items()), card
    assert "**User, turn 1**" in card
    again = run_cli("run", str(recipe))  # complete: the summary, nothing generated or judged again
    assert "already complete" in again.stderr and d["generations"].count == len(gens)
    run_cli("report", "conv-chat", "--out", "r.html")
    assert "Turns per kept conversation" in Path("r.html").read_text()


def test_a_judge_scores_each_kept_conversations_last_answer_in_context(run_cli, recipes, smollm2_model):
    from appliance.runs.items import JUDGE_BASE

    run_cli("models", "add", str(smollm2_model), "--name", SMOL)
    judge = '\n[judge]\nthreshold = 1.0\n[[judge.criteria]]\nname = "grounded"\ndescription = "Answers from the passage."\n'
    recipe = variant(recipes, "conv-judged", count="3", filters=LENIENT + judge)
    run_cli("run", str(recipe))
    d = sqlite_utils.Database(run_cli.db)
    gens = {g["id"]: g for g in d["generations"].rows}
    judged = [g for g in gens.values() if g["item_index"] >= JUDGE_BASE]
    verdicts = {v["generation_id"]: v for v in d.query("select * from verdicts where filter = 'judge'")}
    examples = {e["generation_id"]: e for e in d["examples"].rows}
    assert judged and len(verdicts) == len(judged)
    for generation_id, v in verdicts.items():  # on the example's last answer, at JUDGE_BASE + its index
        assert generation_id in examples and json.loads(v["detail_json"]).keys() == {"grounded"}
        assert any(g["item_index"] == JUDGE_BASE + gens[generation_id]["item_index"] for g in judged)
    turns = json.loads(examples[next(iter(verdicts))]["messages_json"])
    prompt = next(g["rendered_prompt"] for g in judged)
    assert "Response:" in prompt and ("User: " in prompt or len(turns) == 2)
    assert "already complete" in run_cli("run", str(recipe)).stderr and d["generations"].count == len(gens)


def test_completion_mode_on_the_demo_model_is_a_transcript_cut_at_the_last_good_exchange(run_cli, recipes):
    recipe = variant(recipes, "conv-completion", count="3", model='"gemma-3-270m-q4_k_m"', on_bad_turn='"cut"',
                     filters=LENIENT + "max_words = 40\n")
    result = run_cli("run", str(recipe), ok=False)
    assert "conversations: 3 started" in result.stderr, result.stderr
    d = sqlite_utils.Database(run_cli.db)
    assert list(d["runs"].rows)[0]["mode"] == "completion"
    assert_turn_by_turn(d, 2)
    gens = {g["item_index"]: g for g in d["generations"].rows}
    assert all(g["messages_json"] is None for g in gens.values())
    assert gens[0]["rendered_prompt"].endswith("\n\nUser:") and "Here is a passage:" in gens[0]["rendered_prompt"]
    answer = gens[ITEM_LIMIT]["rendered_prompt"]
    assert answer.startswith("You answer questions about the passage") and answer.endswith("\nAssistant:")
    assert f"User: {clean_turn(gens[0]['output'])}\nAssistant:" in answer
    assert all("\nUser:" not in g["output"] and "\nAssistant:" not in g["output"] for g in gens.values())  # stopped at the marker
    for e in d["examples"].rows:
        if e["kept"]:
            messages = json.loads(e["messages_json"])
            assert len(messages) % 2 == 0 and messages[-1]["role"] == "assistant"


def test_a_failing_turn_stops_its_conversation_there(run_cli, recipes, smollm2_model):
    run_cli("models", "add", str(smollm2_model), "--name", SMOL)
    recipe = variant(recipes, "conv-stop", count="2", filters="[filters]\nmin_words = 0\nmax_words = 1\nallow_truncated = true\n")  # every message is longer
    result = run_cli("run", str(recipe), ok=False)
    assert result.exit_code == 1 and "kept nothing" in result.output
    d = sqlite_utils.Database(run_cli.db)
    assert sorted(g["item_index"] for g in d["generations"].rows) == [0, 1]  # no answer to a failed question
    assert {v["filter"] for v in d["verdicts"].rows if not v["passed"]} == {"length"}
    assert [e["kept"] for e in d["examples"].rows] == [0, 0]


def _turn(gid: int, index: int, text: str) -> dict:
    return {"id": gid, "item_index": index, "output": text, "finish_reason": "eos", "messages_json": None, "rendered_prompt": ""}


@pytest.mark.parametrize("on_bad_turn", ["drop", "cut"])
def test_drop_or_cut_a_conversation_whose_second_answer_is_not_grounded(recipes, on_bad_turn):
    loaded = load_recipe(variant(recipes, "conv-unit", on_bad_turn=f'"{on_bad_turn}"'))
    chunk = "The citizens are hungry and angry at Caius Marcius, who keeps the corn from them."
    conv = Conversation(0, 1, {"persona": "a student", "goal": "learn"}, chunk_id=7, chunk=chunk)
    stored = {0: {0: _turn(1, 0, "User: Why are the citizens angry?"), 1: _turn(2, ITEM_LIMIT, "They are hungry: Marcius keeps the corn."),
                  2: _turn(3, 2 * ITEM_LIMIT, "What will they do next?"),
                  3: _turn(4, 3 * ITEM_LIMIT, "Dragons fly over distant purple mountains tonight.")}}
    assert not progress(conv, stored[0], loaded.recipe.filters, 2).going
    prompt = load_prompt(REPO / "prompts" / "conversation-assistant.md")
    cands = judge_conversations(loaded.recipe, prompt, [conv], stored)
    example = [c for c in cands if not c.replaced]
    assert len(cands) == 4 and len(example) == 1
    grounded = [v for c in cands for v in c.verdicts if v.filter == "grounded"]
    assert [v.passed for v in grounded] == [True, False]
    ex = example[0]
    if on_bad_turn == "drop":
        assert not ex.kept and ex.generation_id == 4 and len(ex.messages) == 4  # the failed turn carries the drop
    else:
        assert ex.kept and ex.generation_id == 2
        assert ex.messages == [{"role": "user", "content": "Why are the citizens angry?"},
                               {"role": "assistant", "content": "They are hungry: Marcius keeps the corn."}]
        assert ex.instruction == "Why are the citizens angry?" and ex.output == "They are hungry: Marcius keeps the corn."
    assert ex.system.startswith("You answer questions") and chunk in ex.system
    assert isinstance(grounded[0], Verdict)


def test_clean_turn_strips_role_prefixes_and_quotes():
    assert clean_turn("  User: Assistant:  Why?") == "Why?"
    assert clean_turn('**User:** "What does Menenius want?"') == "What does Menenius want?"
    assert clean_turn("Assistant:") == ""
    assert clean_turn("He said: no.") == "He said: no."


@pytest.mark.parametrize("change, message", [
    ({"turns": "0"}, "key 'turns': a conversation has 1 to 16 turns, got 0"),
    ({"turns": "17"}, "key 'turns': a conversation has 1 to 16 turns, got 17"),
    ({"user_prompt": '"../prompts/nowhere.md"'}, "no such prompt file: "),
    ({"kind": '"augmented"'}, "turns, user_prompt, on_bad_turn: only conversation recipes have them"),
    ({"on_bad_turn": '"skip"'}, "key 'on_bad_turn': Input should be 'drop' or 'cut'"),
    ({"judge": '{ criteria = [{ name = "accuracy" }] }'}, "key 'judge.criteria.0.description': is missing"),
])
def test_bad_conversation_recipes_are_one_line_errors(run_cli, recipes, change, message):
    result = run_cli("run", str(variant(recipes, "conv-bad", **change)), ok=False)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not run_cli.db.exists() or sqlite_utils.Database(run_cli.db)["generations"].count == 0


def test_an_ungrounded_prompt_that_uses_the_passage_is_refused(run_cli, recipes):
    path = variant(recipes, "conv-axes", count="2")
    path.write_text(path.read_text().replace('sources = ["sources/coriolanus-act1-excerpt.txt"]\n', ""))
    result = run_cli("run", str(path), ok=False)
    assert result.exit_code == 1 and "uses 'passage'" in result.output and "has no passage" in result.output


def _count(db: Path) -> int:
    try:
        return sqlite_utils.Database(db)["generations"].count if db.exists() else 0
    except sqlite3.Error:
        return 0


def _later_turns(db: Path) -> int:
    try:
        return next(iter(sqlite_utils.Database(db).query(
            "select count(*) n from generations where item_index >= ?", [ITEM_LIMIT])))["n"]
    except sqlite3.Error:
        return 0


def test_sigkill_mid_conversation_then_the_same_command_continues_at_the_next_missing_turn(workdir, recipes, smollm2_model):
    db = workdir / "kill.db"
    env = {**os.environ, "APPLIANCE_DB": str(db)}
    subprocess.run([APPLIANCE, "models", "add", str(smollm2_model), "--name", SMOL], env=env, check=True, capture_output=True)
    recipe = variant(recipes, "conv-kill", count="4", filters=LENIENT)
    command = [APPLIANCE, "run", str(recipe), "--parallel", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _later_turns(db) == 0:  # past the first round: mid-conversation
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {g["item_index"]: g["output"] for g in sqlite_utils.Database(db)["generations"].rows}
    assert 0 < len(before) and list(sqlite_utils.Database(db)["runs"].rows)[0]["status"] == "running"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert "(resumed)" in again.stderr and "conversations: 4 started" in again.stderr, again.stderr
    d = sqlite_utils.Database(db)
    assert [r["status"] for r in d["runs"].rows] == ["completed"]
    after = {g["item_index"]: g["output"] for g in d["generations"].rows}
    assert all(after[i] == text for i, text in before.items())  # nothing stored before the kill is lost or redone
    assert_turn_by_turn(d, 2)
    assert d["examples"].count == 4  # one example per conversation
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "already complete" in final.stderr and d["generations"].count == len(after)


def test_a_user_message_that_repeats_the_answer_before_it_fails_the_echo_guard(recipes):
    f = load_recipe(variant(recipes, "conv-echo")).recipe.filters
    chunk = ("MENENIUS: The senators of Rome are this good belly, and you the mutinous members; for examine their counsels and "
             "their cares, digest things rightly touching the weal o' the common, you shall find no public benefit which you "
             "receive but it proceeds or comes from them to you and no way from yourselves. Your knees to them, not arms, must help.")
    answer = 'The line in this passage about the Roman state is: "Your knees to them, not arms, must help."'
    echo = [v for v in check_turn(answer, "eos", 0, chunk, f, previous=answer) if v.filter == "echo"][0]
    assert not echo.passed and "previous answer" in echo.reason
    fine = [v for v in check_turn("Why must they kneel rather than fight?", "eos", 0, chunk, f, previous=answer) if v.filter == "echo"][0]
    assert fine.passed
