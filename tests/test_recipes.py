"""Dataset recipes end to end on the demo model: each kind, resume after an interruption, export in
every format, and the recipe's bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlite_utils

from appliance.recipes.judge import judge
from appliance.recipes.run import run_recipe
from appliance.errors import RunInterrupted
from appliance.events import RunEvents
from appliance.recipes.fidelity import FIDELITY_BASE
from appliance.models.registry import Registry
from appliance.recipes.recipe import Recipe, load_recipe
from appliance.recipes.retry import ITEM_LIMIT, RETRY_BUDGET
from appliance.store.database import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def recipes(workdir: Path) -> Path:
    shutil.copytree(REPO / "recipes", workdir / "recipes")
    return workdir / "recipes"


def shrink(path: Path, **changes: str) -> Path:
    """A copy of a shipped recipe with some lines replaced (e.g. a smaller count for tests)."""
    text = path.read_text()
    for key, value in changes.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} = ") else line for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    out = path.with_name(path.stem + "-test.toml")
    out.write_text(text.replace(f'name = "{path.stem}"', f'name = "{path.stem}-test"'))
    return out


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca", "jsonl"])
def test_synthetic_recipe_runs_and_exports(run_cli, recipes, fmt):
    recipe = shrink(recipes / "synthetic-reviews.toml", count="6", fidelity="[]")
    result = run_cli("run", str(recipe), "--quiet")
    assert "6/6 generated" in result.stderr
    runs = run_cli.table("runs")
    assert runs[0]["kind"] == "synthetic" and runs[0]["status"] == "completed"
    gens = [g for g in run_cli.table("generations") if g["item_index"] < ITEM_LIMIT]  # the items, not retries of empty ones
    assert len(gens) == 6 and len({g["item_index"] for g in gens}) == 6
    combos = {(json.loads(g["variables_json"])["product"], json.loads(g["variables_json"])["tone"]) for g in gens}
    assert len(combos) == 6  # axes combinations are not repeated before all are used
    verdicts = run_cli.table("verdicts")
    assert {v["filter"] for v in verdicts} >= {"not_empty", "truncated", "length"}
    kept = [e for e in run_cli.table("examples") if e["kept"]]
    out = Path("reviews.jsonl")
    exported = run_cli("export", "1", "--format", fmt, "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(kept) and f"all: {len(kept)} examples" in exported.stdout
    first = rows[0]
    if fmt == "openai":
        assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
        assert first["messages"][1]["content"].startswith("Write a ")
    elif fmt == "sharegpt":
        assert [m["from"] for m in first["conversations"]] == ["system", "human", "gpt"]
    elif fmt == "alpaca":
        assert set(first) >= {"instruction", "input", "output"}
    else:
        assert set(first) >= {"id", "instruction", "output", "group"}
    card = Path("reviews.card.md").read_text()
    assert f"examples: {len(kept)}" in card and "```" in card


def test_annotated_recipe_keeps_original_text_and_guards_echo(run_cli, recipes):
    recipe = shrink(recipes / "annotated-coriolanus.toml", count="6")
    result = run_cli("run", str(recipe), "--quiet")
    assert "echo: instruction/output length ratio" in result.stderr
    d = sqlite_utils.Database(run_cli.db)
    assert d["sources"].count == 1 and d["chunks"].count >= 6
    examples = list(d.query(
        "select e.instruction, e.output, c.text chunk, s.path from examples e join chunks c on c.id = e.chunk_id "
        "join sources s on s.id = c.source_id"))
    assert len(examples) == 6
    source_text = (recipes / "sources" / "coriolanus-act1-excerpt.txt").read_text()
    for e in examples:
        assert e["output"] == e["chunk"].strip() and e["output"] in source_text  # trains on the original text
    echo = list(d.query("select passed, reason from verdicts where filter = 'echo'"))
    assert len(echo) >= 1 and all(r["reason"] for r in echo)


def test_augmented_recipe_keeps_lineage(run_cli, recipes):
    recipe = shrink(recipes / "augmented-qa.toml", count="4")
    run_cli("run", str(recipe), "--quiet", ok=False)  # a base 270M model may get every answer dropped
    d = sqlite_utils.Database(run_cli.db)
    rows = list(d.query(
        "select g.id, g.chunk_id, e.instruction, e.input, e.output, c.text from generations g "
        "join examples e on e.generation_id = g.id join chunks c on c.id = g.chunk_id"))
    assert len(rows) == 4
    for r in rows:
        assert r["input"] == r["text"].strip()  # the grounding passage travels with the example
    filters = {r["filter"] for r in d.query("select distinct filter from verdicts")}
    assert "parse" in filters


def test_interrupted_run_resumes_to_exactly_n_items(workdir, recipes):
    loaded = load_recipe(shrink(recipes / "synthetic-reviews.toml", count="8", fidelity="[]"))
    store = Store(workdir / "appliance.db")
    seen = []

    class StopAfterThree(RunEvents):
        def row(self, row):
            seen.append(row["item_index"])
            if len(seen) == 3:
                raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match=r"--resume \d+"):
        run_recipe(store, Registry(store), loaded, n_parallel=2, events=StopAfterThree())
    run = store.rows("select * from runs")[0]
    assert run["status"] == "interrupted"
    stored = store.rows("select count(*) n from generations")[0]["n"]
    assert 3 <= stored < 8
    summary = run_recipe(store, Registry(store), loaded, n_parallel=2)
    assert summary.resumed and summary.run_id == run["id"]
    gens = store.rows("select item_index, item_key from generations where run_id = ?", [run["id"]])
    items = [g for g in gens if g["item_index"] < ITEM_LIMIT]
    assert len(items) == 8 and len({g["item_index"] for g in items}) == 8 and len({g["item_key"] for g in gens}) == len(gens)
    assert store.rows("select status from runs")[0]["status"] == "completed"
    again = run_recipe(store, Registry(store), loaded)  # complete: nothing generated again
    assert again.execution is None and store.rows("select count(*) n from generations")[0]["n"] == len(gens)


def test_fidelity_cue_and_provenance_on_the_shipped_recipe(run_cli, recipes):
    """Each output is re-labelled with its tone under a grammar; mismatches are dropped with the predicted
    value named; the run row and the card carry provenance and the fidelity rate."""
    recipe = shrink(recipes / "synthetic-reviews.toml", count="6")
    result = run_cli("run", str(recipe), "--quiet")
    d = sqlite_utils.Database(run_cli.db)
    tones = ["enthusiastic", "disappointed", "matter-of-fact"]
    checks = list(d.query("select g.*, p.name prompt from generations g join prompts p on p.id = g.prompt_id "
                          f"where item_index >= {FIDELITY_BASE}"))
    finals = {g["id"]: g for g in d.query(f"select * from generations where item_index < {ITEM_LIMIT * (RETRY_BUDGET + 1)}")}
    assert checks and all(c["prompt"] == "review-tone-check" for c in checks)
    verdicts = {v["generation_id"]: v for v in d.query("select * from verdicts where filter = 'fidelity'")}
    examples = {e["generation_id"]: e for e in d["examples"].rows}
    for c in checks:
        v = json.loads(c["variables_json"])
        labelled = c["output"].strip()
        assert labelled in tones  # the grammar allows nothing else
        asked = json.loads(finals[v["generation_id"]]["variables_json"])["tone"]
        assert v["expected"] == asked and v["axis"] == "tone"
        verdict = verdicts[v["generation_id"]]
        assert bool(verdict["passed"]) == (labelled == asked) and repr(labelled) in verdict["reason"]
        if labelled != asked:
            assert examples[v["generation_id"]]["kept"] == 0
    hits = sum(v["passed"] for v in verdicts.values())
    assert f"fidelity tone: {hits} of {len(checks)} outputs labelled as asked" in result.stderr
    assert not any(e["output"].startswith("Review:") for e in examples.values())
    run = next(iter(d["runs"].rows))
    assert run["status"] == "completed" and "internal error" not in result.stderr
    if len(checks) >= 5 and len({c["output"] for c in checks}) == 1:
        assert "whatever was asked" in result.stderr  # a check that labels everything alike is called out
    model = next(iter(d["models"].rows))
    prompt = next(p for p in d["prompts"].rows if p["name"] == "product-review")
    assert (run["model_file"], run["model_quant"], run["prompt_sha256"]) == (Path(model["path"]).name, "Q4_K_M", prompt["sha256"])
    assert run["llama_cpp_version"] and run["appliance_version"] and run["model_params"] == model["n_params"]
    assert sum(e["kept"] for e in examples.values())
    run_cli("export", "1", "--out", "reviews.jsonl")
    card = Path("reviews.card.md").read_text()
    assert "## Fidelity" in card and f"| tone | {hits} | {len(checks)} |" in card
    assert model["sha256"] in card and prompt["sha256"] in card and "## Appendix: prompts" in card
    assert "Tone: {{ tone }}" in card and "llama-cpp-python" in card and "near-duplicates across splits: n/a" in card


def test_empty_outputs_are_retried_with_new_seeds_then_dropped_once(run_cli, recipes):
    """A stop string the model always writes first (a space) makes every attempt empty: each item is tried
    1 + RETRY_BUDGET times with distinct seeds, recorded, then dropped once, under not_empty."""
    recipe = shrink(recipes / "synthetic-reviews.toml", count="3", fidelity="[]")
    recipe.write_text(recipe.read_text().replace("max_tokens = 64", 'max_tokens = 8\nstop = [" "]'))
    result = run_cli("run", str(recipe), "--quiet", ok=False)
    assert result.exit_code == 1 and "kept nothing: dropped 3 by not_empty" in result.stderr
    gens = run_cli.table("generations")
    assert sorted(g["item_index"] for g in gens) == sorted(a * ITEM_LIMIT + i for a in range(RETRY_BUDGET + 1) for i in range(3))
    assert len({g["seed"] for g in gens}) == len(gens) and all(g["output"].strip() == "" for g in gens)
    messages = [e["message"] for e in run_cli.table("run_events")]
    assert sum("loaded in" in m for m in messages) == 1  # the retries ran on the run's one loaded model
    events = [m for m in messages if m.startswith("retry")]
    assert [e.split(":")[0] for e in events] == [f"retry {a} of {RETRY_BUDGET}" for a in range(1, RETRY_BUDGET + 1)]
    assert "3 empty outputs generated again with new seeds (items 0, 1, 2)" in events[0]
    replaced = [v for v in run_cli.table("verdicts") if "generated again with a new seed as item" in v["reason"]]
    assert len(replaced) == 3 * RETRY_BUDGET
    assert len(run_cli.table("examples")) == 3  # one per item, its final attempt
    assert "empty outputs generated again with a new seed: 6" in result.stderr
    runs = run_cli("runs").stdout
    assert "3/3 generated" in runs and "(dropped: not_empty 3)" in runs  # not also under length: counted once
    run_cli("run", str(recipe), "--quiet", ok=False)  # the completed run again: nothing regenerated
    assert len(run_cli.table("generations")) == len(gens)


def test_judge_uses_the_final_attempt_and_strips_the_cue_echo():
    """Pure judging of stored rows: a retried item is judged by its last attempt; an echo of "Review:" is
    removed and recorded; an output failing two filters is dropped under the first."""
    recipe = Recipe(kind="synthetic", model="m", prompt="p.md", count=3, axes={"tone": ["calm"]},
                    instruction="Write a {{ tone }} review.", filters={"min_words": 3})
    prompt = "Tone: calm\nReview: Fine.\n\nTone: calm\nReview:"

    def gen(id_: int, index: int, output: str, finish: str = "stop") -> dict:
        return {"id": id_, "item_index": index, "output": output, "rendered_prompt": prompt, "finish_reason": finish,
                "chunk_id": None, "variables_json": '{"tone": "calm"}'}

    gens = [gen(1, 0, ""), gen(2, 1, " Review: Quiet and warm, as promised."), gen(3, 2, " Ok", "length"),
            gen(4, ITEM_LIMIT, " A kettle that boils without fuss.")]
    cands = {c.generation_id: c for c in judge(recipe, gens, {}, None)}
    assert cands[1].replaced and [v.filter for v in cands[1].verdicts] == ["not_empty"]
    assert f"as item {ITEM_LIMIT}" in cands[1].verdicts[0].reason
    assert cands[4].kept and cands[4].item_index == 0 and cands[4].instruction == "Write a calm review."
    assert cands[2].kept and cands[2].output == "Quiet and warm, as promised."
    assert cands[2].verdicts[0].filter == "cue" and "'Review:'" in cands[2].verdicts[0].reason
    failed = [v.filter for v in cands[3].verdicts if not v.passed]
    assert failed == ["truncated", "length"]  # stored in this order; the summary counts it under truncated


def test_resume_refuses_a_changed_recipe_and_new_run_starts_over(run_cli, recipes):
    recipe = shrink(recipes / "synthetic-reviews.toml", count="2")
    run_cli("run", str(recipe), "--quiet")
    recipe.write_text(recipe.read_text().replace("seed = 1", "seed = 2"))
    result = run_cli("run", str(recipe), "--quiet", ok=False)
    assert result.exit_code == 1 and "recipe changed since run 1 (seed)" in result.stderr
    run_cli("run", str(recipe), "--quiet", "--new-run")
    assert len(run_cli.table("runs")) == 2


def test_export_split_is_deterministic_and_leak_free(run_cli, recipes):
    recipe = shrink(recipes / "synthetic-reviews.toml", count="10")
    run_cli("run", str(recipe), "--quiet")
    run_cli("export", "1", "--format", "alpaca", "--out", "a.jsonl", "--split", "train=0.7,test=0.3", "--seed", "4")
    train = Path("a.train.jsonl").read_text()
    test = Path("a.test.jsonl").read_text()
    run_cli("export", "1", "--format", "alpaca", "--out", "b.jsonl", "--split", "train=0.7,test=0.3", "--seed", "4")
    assert Path("b.train.jsonl").read_text() == train and Path("b.test.jsonl").read_text() == test
    outputs_train = {json.loads(line)["output"] for line in train.splitlines()}
    outputs_test = {json.loads(line)["output"] for line in test.splitlines()}
    assert outputs_train and outputs_test and not outputs_train & outputs_test


BAD_RECIPES = [
    ("unknown key", 'kind = "synthetic"\nmodel = "m"\nprompt = "p.md"\ncount = 2\ncolour = "red"\n', "key 'colour': unknown key"),
    ("wrong type", 'kind = "synthetic"\nmodel = "m"\nprompt = "p.md"\ncount = "many"\n', "key 'count'"),
    ("bad kind", 'kind = "magic"\nmodel = "m"\nprompt = "p.md"\n', "key 'kind'"),
    ("no sources", 'kind = "annotated"\nmodel = "m"\nprompt = "p.md"\n', "needs sources"),
    ("not toml", 'kind = \n', "not valid TOML"),
    ("nested unknown", 'kind = "synthetic"\nmodel = "m"\nprompt = "p.md"\ncount = 2\n[filters]\nmin_wrods = 3\n', "key 'filters.min_wrods': unknown key"),
]


@pytest.mark.parametrize("name, text, message", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_recipe_names_file_key_and_problem(run_cli, workdir, name, text, message):
    path = workdir / "bad.toml"
    path.write_text(text)
    result = run_cli("run", str(path), ok=False)
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "bad.toml" in line and message in line, line


def test_recipe_prompt_variable_not_given(run_cli, workdir, demo_model):
    (workdir / "p.md").write_text("Write about {{ topic }} in {{ style }}:\n")
    (workdir / "r.toml").write_text(f'kind = "synthetic"\nmodel = "{demo_model}"\nprompt = "p.md"\ncount = 2\n[axes]\ntopic = ["a", "b"]\n')
    result = run_cli("run", "r.toml", ok=False)
    assert result.exit_code == 1 and "'style'" in result.stderr and "does not give" in result.stderr


def test_empty_source_folder_and_bad_source_files(run_cli, workdir, recipes):
    (workdir / "empty").mkdir()
    recipe = recipes / "annotated-coriolanus.toml"
    text = recipe.read_text()
    bad = workdir / "recipes" / "empty.toml"
    bad.write_text(text.replace('sources = ["sources/coriolanus-act1-excerpt.txt"]', 'sources = ["../empty"]').replace('name = "annotated-coriolanus"', 'name = "e"'))
    result = run_cli("run", str(bad), ok=False)
    assert result.exit_code == 1 and "no .txt, .md or .jsonl files" in result.stderr
    mixed = workdir / "mixed"
    mixed.mkdir()
    shutil.copy(recipes / "sources" / "coriolanus-act1-excerpt.txt", mixed / "good.txt")
    (mixed / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (mixed / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    ok = workdir / "recipes" / "mixed.toml"
    ok.write_text(text.replace('sources = ["sources/coriolanus-act1-excerpt.txt"]', 'sources = ["../mixed"]')
                  .replace("count = 16", "count = 2").replace('name = "annotated-coriolanus"', 'name = "m"'))
    result = run_cli("run", str(ok), "--quiet", ok=False)
    assert "warning: skipped source" in result.stderr and "latin1.txt" in result.stderr and "blob.txt" in result.stderr
    d = sqlite_utils.Database(run_cli.db)
    assert d["generations"].count == 2
    events = [e["message"] for e in d["run_events"].rows]
    assert sum("skipped source" in e for e in events) == 2


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(-2, 2, allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
_keys = st.sampled_from(["kind", "model", "prompt", "count", "seed", "sources", "axes", "filters", "sampling", "chunking", "schema", "extra"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8), st.sampled_from(["synthetic", "annotated", "augmented", None]))
def test_recipe_parser_gives_a_recipe_or_one_line_error(tmp_path_factory, data, kind):
    """Any TOML-shaped input: either a valid recipe or a RecipeError of one line naming the file."""
    from appliance.recipes.recipe import RecipeError

    if kind:
        data = {**data, "kind": kind}
    path = tmp_path_factory.mktemp("fuzz") / "r.toml"
    lines = []
    for key, value in data.items():
        if value is None:
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert "\n" not in str(exc) and "r.toml" in str(exc)
