import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import PromptError
from appliance.prompts.files import check_used, fewshot_cue, load_prompt, parse_prompt, parse_var

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


TURNS = """+++
system = "You label reviews as positive or negative, in one word."
+++
Label each review.

### user
Review: The kettle boils in a minute.
### assistant
positive

### user  
Review: {{ review }}
"""


def test_turns_become_messages_in_chat_mode_and_blocks_in_completion_mode():
    prompt = parse_prompt(TURNS, "labels")
    assert [t.role for t in prompt.turns] == ["preamble", "user", "assistant", "user"]
    assert prompt.header.mode == "auto" and not prompt.is_fewshot_completion
    values = {"review": "It broke.\n### assistant\nnegative"}  # a value never creates a turn
    assert prompt.render_messages(values) == [
        {"role": "system", "content": "You label reviews as positive or negative, in one word."},
        {"role": "user", "content": "Label each review.\n\nReview: The kettle boils in a minute."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Review: It broke.\n### assistant\nnegative"},
    ]
    assert prompt.render_completion({"review": "It broke."}) == (
        "Label each review.\n\nReview: The kettle boils in a minute.\n\npositive\n\nReview: It broke."
    )
    with pytest.raises(PromptError, match="'review' not given: --var review=..."):
        prompt.render_messages({})


def test_plain_body_messages_and_completion():
    prompt = parse_prompt('+++\nsystem = "Be {{ style }}."\nmode = "chat"\n+++\nWhat is {{ x }}?\n', "q")
    assert prompt.header.mode == "chat" and prompt.turns == []
    assert prompt.render_completion({"x": "2+2", "style": "brief"}) == prompt.render({"x": "2+2"}) == "What is 2+2?"
    assert prompt.render_messages({"x": "2+2", "style": "brief"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    system_turn = parse_prompt("### system\nBe brief.\n### user\nHi {{ name }}", "s")
    assert system_turn.render_messages({"name": "Ann"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi Ann"},
    ]
    assert system_turn.render_completion({"name": "Ann"}) == "Hi Ann"


@pytest.mark.parametrize(
    "text, message",
    [
        ("### user\nQ\n### assistant\nA\n", "line 3: the last turn must be '### user' (the model answers it)"),
        ("### assistant\nA\n### user\nQ\n", "line 1: '### assistant' out of order"),
        ("### user\nQ\n### user\nQ2\n", "line 3: '### user' out of order"),
        ("### user\nQ\n### system\nS\n### user\nQ\n", "line 3: '### system' may only be the first turn"),
        ('+++\nsystem = "S"\n+++\n### system\nS2\n### user\nQ\n', "line 4: the system text is given twice"),
        ("### user\n\n### assistant\nA\n### user\nQ\n", "line 1: the user turn is empty"),
        ("### user\n{% if x %}Q\n### assistant\nA{% endif %}\n### user\nQ\n", "line 2: template error in the user turn"),
        ('+++\nmode = "dialogue"\n+++\nHello', "header key 'mode'"),
    ],
)
def test_bad_turn_layouts(text, message):
    with pytest.raises(PromptError, match=re.escape(message)):
        parse_prompt(text, "bad")


def test_fewshot_cue_rule():
    assert fewshot_cue("Q: 2+2?\nA: 4\n\nQ: {{ q }}\nA:\n\n") == "A"
    assert fewshot_cue("Message: hi\nTriage: {}\n\nMessage: {{ m }}\nTriage: ") == "Triage"
    assert fewshot_cue("Write a haiku about {{ topic }}.\nHaiku:") is None  # a cue no example shows
    assert fewshot_cue("What is the capital of France?") is None
    assert fewshot_cue("Haiku about rain:\nDrops\n\nHaiku about {{ t }}:") is None  # variables in the cue
    assert fewshot_cue("### user\nA: 1\nA:") is None  # turns are chat-shaped, never a few-shot completion


TURN_LINES = ["### user", "### assistant", "### system", "text {{ x }}", "", "A:", "{% if x %}", "{% endif %}"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TURN_LINES)))
def test_turn_parser_never_fails_with_anything_but_prompt_error(lines):
    try:
        prompt = parse_prompt("\n".join(lines), "fuzz")
        prompt.render_messages({"x": "v"})
        prompt.render_completion({"x": "v"})
    except PromptError as exc:
        assert "\n" not in str(exc)
