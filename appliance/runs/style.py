"""How a prompt reaches a model: as chat messages through its chat template, or as completion text.

`style_for` decides once per run (see `appliance.chat.decide_mode` for the rule) and the resulting
`PromptStyle` turns prompt files, task prompts and message lists into `Item`s: the text the model
sees (`Item.prompt`, stored as `generations.rendered_prompt`), the messages it was rendered from
(`generations.messages_json`), and whether the tokenizer should add a BOS (not when the template
already wrote one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..prompts.chat import BUILTIN_TEMPLATES, ChatTemplate, decide_mode, load_chat_template
from ..errors import ChatTemplateError, ResumeError
from ..models.registry import ModelRecord
from ..prompts.files import PromptFile
from .items import Item


# Stands where a user's message content would be, to find where a template writes it (Magpie's pre-query text).
QUERY_SENTINEL = "APPLIANCE7f3aUSERQUERY"
_MARKER = re.compile(r"<[^<>\s]{1,48}>")  # a template's special-token text: <|im_end|>, <end_of_turn>, </s>


@dataclass(frozen=True)
class PreQuery:
    """What a chat template writes before a user message's content (Magpie feeds a model only this, and the
    model writes the user's request itself), and what it writes after it."""

    text: str  # the pre-query text: everything up to where the user's content starts
    add_bos: bool  # whether the tokenizer should still add a BOS (not when `text` starts with it)
    markers: tuple[str, ...]  # the template's markers after the user content (end of turn, assistant header)
    assistant_header: str  # the generation prompt without its markers ("assistant" in ChatML), or ""
    system_merged: bool = False  # the template has no system role: the system text opens the user turn

    def request(self, output: str) -> str:
        """A generated request cut at the first marker the model wrote out as text, and at a line that is the
        assistant's header (a control token the model sampled renders as nothing, leaving only its role)."""
        cut = min((at for at in (output.find(m) for m in self.markers) if at >= 0), default=len(output))
        lines = output[:cut].split("\n")
        if self.assistant_header:
            for n, line in enumerate(lines):
                if line.strip().lower() == self.assistant_header.lower():
                    lines = lines[:n]
                    break
        return "\n".join(lines).strip()

    def opens_answer(self, output: str) -> bool:
        """Whether a generated request begins with the assistant's turn: the model answered instead of asking."""
        text = output.lstrip()
        first = text.split("\n", 1)[0].strip().lower()
        return any(text.startswith(m) for m in self.markers) or bool(self.assistant_header) and first == self.assistant_header.lower()


@dataclass
class PromptStyle:
    mode: str  # chat | completion
    template: ChatTemplate | None
    model_name: str
    system: str | None = None  # replaces the prompt file's system text (a recipe's `system`)

    @property
    def chat(self) -> bool:
        return self.mode == "chat"

    def render(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The chat prompt text for `messages`, and whether the tokenizer should still add a BOS."""
        assert self.template is not None
        text = self.template.render(messages, add_generation_prompt=True)
        bos = self.template.bos_token
        return text, not (bos and text.startswith(bos))

    def pre_query(self, system: str | None = None) -> PreQuery:
        """The template's text before a user message's content, with `system` as the system message (None: the
        template's own default, if it has one). Refused when the template does not write the user's content
        verbatim (it changes it), since the cut would then be a guess."""
        if self.template is None:
            raise ChatTemplateError(f"{self.model_name} has no chat template, so it has no pre-query text", "config")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": QUERY_SENTINEL}]
        rendered = self.template.render_chat(messages, add_generation_prompt=True)
        closed = self.template.render_chat(messages, add_generation_prompt=False).text
        text = rendered.text
        if text.count(QUERY_SENTINEL) != 1 or closed.count(QUERY_SENTINEL) != 1:
            raise ChatTemplateError(
                f"chat template of {self.model_name} ({self.template.where}) does not write a user message's content "
                "verbatim, so its pre-query text cannot be cut out of it", "config")
        at = text.index(QUERY_SENTINEL)
        before, after = text[:at], text[at + len(QUERY_SENTINEL):]
        generation_prompt = text[len(closed):] if text.startswith(closed) else ""
        markers = tuple(dict.fromkeys(_MARKER.findall(after))) or ((after.strip(),) if after.strip() else ())
        bos = self.template.bos_token
        return PreQuery(text=before, add_bos=not (bos and before.startswith(bos)), markers=markers,
                        assistant_header=_MARKER.sub("", generation_prompt).strip(), system_merged=rendered.system_merged)

    def item(self, prompt: PromptFile, values: dict[str, Any], **fields: Any) -> Item:
        """An item from a prompt file and its variables."""
        if not self.chat:
            return Item(prompt=prompt.render_completion(values), variables=values, **fields)
        messages = prompt.render_messages(values)
        if self.system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": self.system})
        return self.message_item(messages, variables=values, **fields)

    def message_item(self, prompt: str | list[dict[str, str]], **fields: Any) -> Item:
        """An item from a completion text (completion mode) or a list of messages (chat mode)."""
        if isinstance(prompt, str):
            return Item(prompt=prompt, **fields)
        text, add_bos = self.render(prompt)
        return Item(prompt=text, messages=prompt, add_bos=add_bos, **fields)

    def run_fields(self) -> dict[str, Any]:
        """What the run row records about how prompts reached the model."""
        return {"mode": self.mode, "chat_template_sha256": self.template.sha256 if self.chat and self.template else None}

    def check_resume(self, run: dict[str, Any]) -> None:
        """Refuse to continue a run whose outputs were prompted differently."""
        old_mode = run.get("mode") or "completion"  # runs made before chat support were all completions
        if old_mode != self.mode:
            raise ResumeError(
                f"run {run['id']} was prompted in {old_mode} mode and would now be in {self.mode} mode "
                f"(model {self.model_name}); use --new-run to start over, or --mode {old_mode} to continue it"
            )
        if self.chat and self.template and run.get("chat_template_sha256") not in (None, self.template.sha256):
            raise ResumeError(
                f"the chat template of {self.model_name} changed since run {run['id']} "
                f"(sha256 {run['chat_template_sha256'][:12]} -> {self.template.sha256[:12]}); use --new-run to start over"
            )


def style_for(
    record: ModelRecord,
    *,
    prompt: PromptFile | None = None,
    mode: str | None = None,
    chat_template: str | None = None,
    fewshot: bool | None = None,
    system: str | None = None,
) -> PromptStyle:
    """How to prompt `record`: `mode` (None: the prompt file's, else auto), the model's chat template
    or the `chat_template` override. `fewshot` says whether the prompt is a few-shot completion (None:
    ask the prompt file; False for prompts the appliance builds in both forms)."""
    requested = mode or (prompt.header.mode if prompt is not None else None) or "auto"
    template = load_chat_template(record.info, chat_template, record.name)
    is_fewshot = fewshot if fewshot is not None else (prompt.is_fewshot_completion if prompt is not None else False)
    if requested == "auto" and template is None and prompt is not None and any(t.role == "assistant" or t.role == "user" for t in prompt.turns):
        raise ChatTemplateError(
            f"prompt {prompt.path or prompt.name} is written as chat turns (### user / ### assistant) but {record.name} has no chat "
            f"template, so it would run as plain completion text: pass --chat-template NAME|FILE (built-in: "
            f"{', '.join(BUILTIN_TEMPLATES)}) for an instruct model, or --mode completion to send the turns as text",
            "config",
        )
    resolved = decide_mode(requested, template, is_fewshot, record.name)
    return PromptStyle(mode=resolved, template=template, model_name=record.name, system=system)
