"""Chat templates: how an instruct model wants a conversation written out, and when to use one.

Templates are Hugging Face-style Jinja2 (`tokenizer.chat_template` in the GGUF header, a built-in by
name, or a file). A GGUF header is untrusted input (CVE-2024-34359: llama-cpp-python rendered
templates unsandboxed and a crafted GGUF ran code), so template code never runs in this process: a
render worker (`appliance.chat_worker`: one small Python subprocess, started on first use and reused) renders in Jinja2's
`ImmutableSandboxedEnvironment` under a 512 MiB address-space limit, and this process kills it when
one render takes longer than `RENDER_TIMEOUT_S` or writes more than `MAX_OUTPUT_CHARS`. Attribute
walking (`''.__class__.__mro__`) is a SecurityError in the worker; every failure reaches the user as
one line naming the model and the problem (`ChatTemplateError`).

System role: `ChatTemplate.render_chat` first renders the messages as given. When the template refuses
them (it calls `raise_exception`, as Gemma's and Mistral's do for a system message, or otherwise fails)
or silently drops the system text (it is not in the output, as Phi-3-mini's template does), the system
text is merged into the first user turn ("SYSTEM\\n\\nUSER") and the conversation rendered again;
`RenderedChat.system_merged` says so.

Mode (`decide_mode`), decided once per run, never per item:
  - `completion`: the prompt text goes to the model as it is (few-shot turns flattened to text blocks).
  - `chat`: the prompt becomes messages rendered through the chat template; without one (the model has
    none and no `--chat-template` was given) this is an error.
  - `auto` (the default): chat when a chat template is available (the model's own or an override) and
    the prompt is not a few-shot completion; completion otherwise.
  A prompt is a few-shot completion when its body (before variables are filled in) has no turn markers
  and its last non-empty line is a cue `Label:` (a short label of up to 40 characters starting with a
  letter, with no `{`, `}` or `:` in it and nothing after the colon) and an earlier line begins with the
  same `Label:`, i.e. the examples above show the pattern the model is to continue. The shipped
  prompts end with `Instruction:`, `Question:`, `Review:` and `Triage:` after examples of each, so they
  stay completions; "What is the capital of France?" is a chat prompt.

BOS: tokenize the rendered text with special tokens parsed. A template that writes the BOS itself
(Llama 3, Gemma, Mistral, Llama 2: `{{ bos_token }}`) plus a vocabulary that adds one (`add_bos`) gives
two BOS tokens; add the vocabulary's BOS only when the rendered text does not already start with it
(equivalently: tokenize with add_special=True and drop the first token when the first two are both BOS).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .sandbox import WORKER_MEMORY_BYTES, render_in_worker
from ..errors import ChatTemplateError

Mode = Literal["auto", "chat", "completion"]
MODES: tuple[str, ...] = ("auto", "chat", "completion")
MAX_OUTPUT_CHARS = 4 << 20  # plus twice the conversation's own length


# Built-in templates, copied from the models' tokenizer_config.json (as llama.cpp's
# tests/test-chat-template.cpp and llama-cpp-python's llama_chat_format.py hold them).
BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (teknium/OpenHermes-2.5-Mistral-7B): Qwen, SmolLM2, Hermes and many fine-tunes
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
        "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 (no system role: it is merged into the first user turn)
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # google/gemma-1.1-2b-it, gemma-2-2b-it (no system role: it is merged into the first user turn)
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    # microsoft/Phi-3.5-mini-instruct
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
}


@dataclass(frozen=True)
class RenderedChat:
    text: str
    messages: list[dict[str, str]] = field(repr=False)  # what was rendered: after a system merge, the merged list
    system_merged: bool = False


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token text it is rendered with."""

    text: str
    origin: str  # "model" (the GGUF's own), "builtin:NAME" or "file:PATH"
    model_name: str = "the model"
    bos_token: str | None = None
    eos_token: str | None = None
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())

    @property
    def where(self) -> str:
        return {"model": "from the GGUF"}.get(self.origin, self.origin)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text (see `render_chat` for the system-role rule)."""
        return self.render_chat(messages, add_generation_prompt).text

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> RenderedChat:
        """Render `messages`; when the template refuses or drops the system message, merge it into the
        first user turn and render again."""
        msgs = _checked(messages)
        system = "\n\n".join(m["content"] for m in _leading_system(msgs))
        try:
            text = self._render(msgs, add_generation_prompt)
        except ChatTemplateError as exc:
            if not system or exc.kind not in ("raised", "error"):
                raise
            merged = merge_system(msgs, self.model_name)
            try:
                return RenderedChat(self._render(merged, add_generation_prompt), merged, True)
            except ChatTemplateError as again:
                merged_too = f"{again} (also with the system text merged into the first user turn)"
                raise ChatTemplateError(merged_too, again.kind) from None
        if system.strip() and system.strip() not in text:
            merged = merge_system(msgs, self.model_name)
            return RenderedChat(self._render(merged, add_generation_prompt), merged, True)
        return RenderedChat(text, msgs, False)

    def check(self) -> None:
        """Render a one-question conversation: a broken template fails when it is loaded, not per item."""
        self.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}])

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        request = {
            "template": self.text,
            "context": {
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token or "",
                "eos_token": self.eos_token or "",
            },
            "max_chars": MAX_OUTPUT_CHARS + 2 * sum(len(m["content"]) for m in messages),
        }
        reply = render_in_worker(request, self.model_name, self.where)
        if reply.get("ok"):
            return reply["text"]
        kind, message = reply.get("kind", "error"), _one_line(str(reply.get("message", "")))
        lead = f"chat template of {self.model_name} ({self.where})"
        detail = {
            "raised": f"refuses the conversation: {message}",
            "security": f"tried to reach outside its sandbox: {message}",
            "syntax": f"is not valid Jinja2: {message}",
            "memory": f"used more than {WORKER_MEMORY_BYTES >> 20} MiB while rendering (a runaway template?)",
            "output": f"rendered more than {request['max_chars']} characters (a runaway template?)",
        }.get(kind, f"failed: {message}")
        raise ChatTemplateError(f"{lead} {detail}", kind)


def merge_system(messages: Sequence[dict[str, str]], model_name: str = "the model") -> list[dict[str, str]]:
    """The leading system message(s) folded into the first user turn: "SYSTEM\\n\\nUSER"."""
    system = [m["content"] for m in _leading_system(messages)]
    rest = [dict(m) for m in messages[len(system) :]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = "\n\n".join([*system, m["content"]])
            return rest
    raise ChatTemplateError(f"chat template of {model_name}: a system message needs a user turn to be merged into", "config")


def _leading_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        if m["role"] != "system":
            break
        out.append(m)
    return out


def _checked(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Plain {role, content} string dicts (the worker gets them as JSON)."""
    out = []
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"a chat message needs string 'role' and 'content', got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise TypeError("a conversation needs at least one message")
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- loading --------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    return list(BUILTIN_TEMPLATES)


def load_chat_template(
    model: Any, override: str | None, model_name: str, *, vocab: Any = None
) -> ChatTemplate | None:
    """The chat template to prompt `model` with: `override` (a built-in name or a template file) or else
    the GGUF's own `tokenizer.chat_template`; None when there is neither.

    `model` is a GGUFInfo, a ModelRecord or a GGUF path. The bos/eos token text comes from llama.cpp's
    vocabulary: `vocab` (an already loaded llama_vocab pointer) or a vocab-only load of the file.
    The template is test-rendered once here, so a broken one fails before any generation.
    """
    info = _gguf_info(model)
    if override is not None:
        text, origin = _override_text(override)
    else:
        text, origin = info.chat_template, "model"
        if text is None or not text.strip():
            return None
        if re.fullmatch(r"\[string of \d+ bytes\]", text):
            raise ChatTemplateError(f"the chat template in {model_name}'s GGUF is too large to use ({text[1:-1]})", "config")
    bos, eos = special_token_text(getattr(model, "path", None) or info.path, vocab)
    template = ChatTemplate(text=text, origin=origin, model_name=model_name, bos_token=bos, eos_token=eos)
    template.check()
    return template


def _gguf_info(model: Any) -> Any:
    from ..models.info import GGUFInfo

    if isinstance(model, GGUFInfo):
        return model
    if isinstance(getattr(model, "info", None), GGUFInfo):
        return model.info
    from ..models.gguf import read_gguf

    return read_gguf(model)


def _override_text(override: str) -> tuple[str, str]:
    if override in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[override], f"builtin:{override}"
    path = Path(override).expanduser()
    names = ", ".join(BUILTIN_TEMPLATES)
    if path.is_dir():
        raise ChatTemplateError(f"--chat-template {override!r} is a directory; give a template file or one of {names}", "config")
    if not path.is_file():
        raise ChatTemplateError(
            f"--chat-template {override!r} is neither a built-in template ({names}) nor an existing template file", "config"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = f"chat template file {path} is not UTF-8 text (bad byte at offset {exc.start})"
        raise ChatTemplateError(bad, "config") from None
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template file {path}: {exc.strerror}", "config") from None
    if not text.strip():
        raise ChatTemplateError(f"chat template file {path} is empty", "config")
    return text, f"file:{path}"


def special_token_text(model_path: str | Path, vocab: Any = None) -> tuple[str | None, str | None]:
    """(bos, eos) token text as llama.cpp's vocabulary has them (special tokens written out); None for a
    token the model lacks. Loads the vocabulary alone (no weights) unless `vocab` is given."""
    import ctypes

    import llama_cpp

    from ..engine.llama import Vocab

    own = None
    if vocab is None:
        own = Vocab(model_path)
        vocab = own.vocab
    try:
        buf = ctypes.create_string_buffer(256)

        def text(token: int) -> str | None:
            if token < 0:
                return None
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            return buf.raw[:n].decode("utf-8", errors="replace") if n > 0 else None

        return text(llama_cpp.llama_vocab_bos(vocab)), text(llama_cpp.llama_vocab_eos(vocab))
    finally:
        if own is not None:
            own.close()


# -- mode -----------------------------------------------------------------------------------------------


def decide_mode(
    requested: str, template: ChatTemplate | None, prompt: Any = None, model_name: str = "the model"
) -> str:
    """'chat' or 'completion' by the rule in this module's docstring. `prompt` is a PromptFile, a prompt
    body (str), or a bool saying whether the prompt is a few-shot completion (None: it is not)."""
    if requested not in MODES:
        raise ChatTemplateError(f"mode must be one of {', '.join(MODES)}, not {requested!r}", "config")
    if requested == "completion":
        return "completion"
    if requested == "chat":
        if template is None:
            raise ChatTemplateError(
                f"{model_name} has no chat template, so chat mode needs one: pass --chat-template NAME|FILE "
                f"(built-in: {', '.join(BUILTIN_TEMPLATES)})",
                "config",
            )
        return "chat"
    if template is None:
        return "completion"
    return "completion" if _is_fewshot(prompt) else "chat"


def _is_fewshot(prompt: Any) -> bool:
    if prompt is None or isinstance(prompt, bool):
        return bool(prompt)
    if isinstance(prompt, str):
        from .files import fewshot_cue, split_turns

        return fewshot_cue(prompt) is not None and len(split_turns(prompt)) <= 1
    return bool(prompt.is_fewshot_completion)
