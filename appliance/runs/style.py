"""How a prompt reaches a model: as chat messages through its chat template, or as completion text.

`style_for` decides once per run (see `appliance.chat.decide_mode` for the rule) and the resulting
`PromptStyle` turns prompt files, task prompts and message lists into `Item`s: the text the model
sees (`Item.prompt`, stored as `generations.rendered_prompt`), the messages it was rendered from
(`generations.messages_json`), and whether the tokenizer should add a BOS (not when the template
already wrote one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..prompts.chat import BUILTIN_TEMPLATES, ChatTemplate, decide_mode, load_chat_template
from ..errors import ChatTemplateError, ResumeError
from ..models.registry import ModelRecord
from ..prompts.files import PromptFile
from .items import Item


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
