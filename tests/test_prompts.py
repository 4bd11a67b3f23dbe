from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import PromptError
from appliance.prompts import check_used, load_prompt, parse_prompt, parse_var

REPO = Path(__file__).resolve().parent.parent


def test_shipped_prompts_parse_and_render():
    for path in sorted((REPO / "prompts").glob("*.md")):
        prompt = load_prompt(path)
        values = {v: "x" for v in prompt.variables} | prompt.values_for_item({}, seed=1)
        text = prompt.render(values)
        assert "{{" not in text and text.strip()


def test_header_body_and_variables():
    prompt = parse_prompt('+++\nname = "x"\nstop = ["\\n\\n"]\nmax_tokens = 5\n[vars]\na = "one"\n+++\nA={{ a }} B={{ b }}\n', "f")
    assert prompt.name == "x"
    assert prompt.header.stop == ["\n\n"] and prompt.header.max_tokens == 5
    assert prompt.variables == ["a", "b"]
    assert prompt.render({"a": 1, "b": 2}) == "A=1 B=2"  # the file's final newline is not part of the prompt
    with pytest.raises(PromptError, match="'b' not given: --var b=..."):
        prompt.render(prompt.values_for_item({}, 0))


def test_a_prompt_ends_on_its_cue_line():
    """The shipped review prompt ends with "Review:" (every few-shot answer starts on its cue's line), not
    with the file's newline, which made the model stop before writing anything."""
    prompt = load_prompt(REPO / "prompts" / "product-review.md")
    text = prompt.render(prompt.values_for_item({}, seed=3))
    assert text.endswith("\nReview:")
    assert parse_prompt("a {{ x }}\n\n", "two").render({"x": 1}) == "a 1\n"  # only the file's own final newline goes


def test_empty_list_in_vars_is_an_error():
    with pytest.raises(PromptError, match="header key 'vars': variable 'tone' is an empty list"):
        parse_prompt('+++\n[vars]\ntone = []\nproduct = ["x"]\n+++\n{{ tone }} {{ product }}', "f")


def test_a_value_the_prompt_does_not_use_is_refused():
    prompt = load_prompt(REPO / "prompts" / "product-review.md")
    check_used(prompt, {"product": "a desk lamp", "tone": "calm"}, "--var")
    with pytest.raises(PromptError) as err:
        check_used(prompt, {"prodcut": "a desk lamp"}, "--var")
    assert str(err.value) == (f"--var 'prodcut' not used by prompt {prompt.path} (its variables: product, tone)")


def test_list_defaults_vary_by_seed_and_given_values_win():
    prompt = parse_prompt('+++\n[vars]\nt = ["a", "b", "c", "d"]\n+++\n{{ t }}', "f")
    picks = {prompt.values_for_item({}, seed)["t"] for seed in range(40)}
    assert picks == {"a", "b", "c", "d"}
    assert prompt.values_for_item({}, 7) == prompt.values_for_item({}, 7)  # reproducible from the seed
    assert prompt.values_for_item({"t": "z"}, 7)["t"] == "z"


def test_no_header_is_fine_and_hash_tracks_content():
    a = parse_prompt("Hello {{ name }}", "greet")
    b = parse_prompt("Hello {{ name }}!", "greet")
    assert a.name == "greet" and a.sha256 != b.sha256


@pytest.mark.parametrize(
    "text, message",
    [
        ("+++\nname = 'x'\nHello", "never closed"),
        ("+++\nname = \n+++\nHello", "not valid TOML"),
        ("+++\nnmae = 'x'\n+++\nHello", "header key 'nmae'"),
        ("+++\nmax_tokens = -3\n+++\nHello", "header key 'max_tokens'"),
        ("+++\nname = 'x'\n+++\n   \n", "no text"),
        ("+++\nname = 'x'\n+++\nline one\nHello {{ name ", "line 5: template error"),
        ("Hello {% for %}", "template error"),
    ],
)
def test_bad_prompt_text(text, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(text, "bad")


def test_bad_prompt_files(tmp_path):
    with pytest.raises(PromptError, match="no such prompt file"):
        load_prompt(tmp_path / "missing.md")
    with pytest.raises(PromptError, match="is a directory"):
        load_prompt(tmp_path)
    empty = tmp_path / "empty.md"
    empty.write_text("")
    with pytest.raises(PromptError, match="is empty"):
        load_prompt(empty)
    latin = tmp_path / "latin.md"
    latin.write_bytes("caf\xe9 {{ x }}".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompt(latin)
    binary = tmp_path / "bin.md"
    binary.write_bytes(b"abc\x00def")
    with pytest.raises(PromptError, match="binary"):
        load_prompt(binary)


def test_sandbox_blocks_python_internals():
    prompt = parse_prompt("{{ x.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(PromptError):
        prompt.render({"x": ""})


def test_parse_var():
    assert parse_var("topic=the sea = deep") == ("topic", "the sea = deep")
    for bad in ("novalue", "=x", "two words=x"):
        with pytest.raises(PromptError):
            parse_var(bad)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parser_never_fails_with_anything_but_prompt_error(text):
    try:
        prompt = parse_prompt(text, "fuzz")
    except PromptError as exc:
        assert "\n" not in str(exc)
        return
    try:
        prompt.render({v: "x" for v in prompt.variables})
    except PromptError as exc:
        assert "\n" not in str(exc)


def test_runtime_template_error_is_a_prompt_error():
    prompt = parse_prompt("{{ name + 1 }}", "typed")
    with pytest.raises(PromptError, match="template failed"):
        prompt.render({"name": "x"})
