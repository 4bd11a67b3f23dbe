"""The fidelity filter's parts without generating: its grammar under llama.cpp's parser, its verdict, the
labels read back from a real SQLite file, and the recipe's bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.recipes.fidelity import FIDELITY_BASE, FidelityError, Check, check_items, grammar, load_checks, uninformative, verdict
from appliance.runs.summary import fidelity_labels as labels, fidelity_rates as rates
from appliance.prompts.files import parse_prompt
from appliance.recipes.recipe import load_recipe
from appliance.store.database import Store

REPO = Path(__file__).resolve().parent.parent


def test_grammar_is_accepted_by_llama_cpp_and_escapes_quotes():
    import llama_cpp

    for values in (["enthusiastic", "disappointed", "matter-of-fact"], ['say "hi"', "back\\slash", "1"]):
        gbnf = grammar(values)
        sampler = llama_cpp.llama_sampler_init_grammar(None, gbnf.encode(), b"root")
        assert sampler, gbnf
        llama_cpp.llama_sampler_free(sampler)
    assert grammar(["a", "b"]) == 'root ::= " "? ("a" | "b")\n'


def test_verdict_names_the_predicted_value():
    ok = verdict({"tone": ("calm", "calm")})
    assert ok.passed and ok.filter == "fidelity" and ok.reason == "tone: labelled 'calm' as asked"
    bad = verdict({"tone": ("disappointed", "enthusiastic"), "length": ("short", "short")})
    assert not bad.passed and bad.score == 0.5
    assert bad.reason == "length: labelled 'short' as asked; tone: asked 'disappointed', labelled 'enthusiastic'"


def test_check_items_render_one_line_and_sit_above_every_item_and_retry():
    prompt = parse_prompt("Text: {{ text }}\nTone ({{ values | join('/') }}):", "p")
    items = check_items([Check("tone", ["calm", "angry"], prompt)], [(4, 17, "Fine.\nReally  fine.", {"tone": "calm"})], 1)
    assert items[0].index == FIDELITY_BASE + 4 and items[0].prompt == "Text: Fine. Really fine.\nTone (calm/angry):"
    assert items[0].variables == {"check": "fidelity", "axis": "tone", "expected": "calm", "of_item": 4, "generation_id": 17}


def _store_with_labels(path: Path, pairs: list[tuple[str, str]]) -> Store:
    store = Store(path)
    run_id = store.start_run(kind="synthetic", requested=len(pairs))
    with store.transaction() as conn:
        for i, (asked, predicted) in enumerate(pairs):
            conn.execute(
                "INSERT INTO generations (run_id, item_key, item_index, rendered_prompt, output, seed, tokens_in, tokens_out, ms, "
                "finish_reason, variables_json, created_at) VALUES (?, ?, ?, 'p', ?, 0, 1, 1, 1, 'eos', ?, 'now')",
                [run_id, f"k{i}", FIDELITY_BASE + i, f" {predicted}",
                 json.dumps({"check": "fidelity", "axis": "tone", "expected": asked, "of_item": i, "generation_id": 100 + i})])
    return store


def test_labels_rates_and_a_check_that_tells_nothing_apart(tmp_path):
    store = _store_with_labels(tmp_path / "a.db", [("calm", "calm"), ("angry", "calm"), ("angry", "angry")])
    rows = store.rows("SELECT item_index, output, variables_json FROM generations")
    assert labels(rows) == {100: {"tone": ("calm", "calm")}, 101: {"tone": ("angry", "calm")}, 102: {"tone": ("angry", "angry")}}
    assert rates(store, 1) == {"tone": (2, 3)} and uninformative(store, 1) == []
    same = _store_with_labels(tmp_path / "b.db", [("calm", "calm"), ("angry", "calm")] * 3)
    assert uninformative(same, 1) == ["fidelity tone: 6 of 6 outputs labelled 'calm' whatever was asked; the check prompt "
                                      "does not tell the values apart (give the recipe a few-shot filters.fidelity_prompt)"]


@pytest.mark.parametrize("change, message", [
    ('fidelity = ["mood"]', "filters.fidelity names 'mood', not an axis (axes: product, tone)"),
    ('fidelity_prompt = "../prompts/extra.md"', "uses 'product', which a check does not give (it gives: text, axis, values)"),
    ('fidelity_prompt = "../prompts/notext.md"', "must use {{ text }}"),
    ('fidelity_prompt = "../prompts/missing.md"', "no such prompt file"),
])
def test_bad_fidelity_settings(tmp_path, change, message):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "notext.md").write_text("Tone of {{ values }}:\n")
    (tmp_path / "prompts" / "extra.md").write_text("Review of {{ product }}: {{ text }}\nTone:\n")
    text = (REPO / "recipes" / "synthetic-reviews.toml").read_text()
    key = change.split(" = ")[0]
    lines = [change if line.startswith(f"{key} = ") else line for line in text.splitlines()]
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text("\n".join(lines) + "\n")
    with pytest.raises(ApplianceError) as err:
        load_checks(load_recipe(recipe))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shipped_recipe_checks_tone_with_its_few_shot_prompt():
    checks = load_checks(load_recipe(REPO / "recipes" / "synthetic-reviews.toml"))
    assert [(c.axis, c.values, c.prompt.name) for c in checks] == [
        ("tone", ["enthusiastic", "disappointed", "matter-of-fact"], "review-tone-check")]
    annotated = load_recipe(REPO / "recipes" / "annotated-coriolanus.toml")
    annotated.recipe.filters.fidelity = ["tone"]
    with pytest.raises(FidelityError, match="only synthetic recipes"):
        load_checks(annotated)
