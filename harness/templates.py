"""Input formats: how an instruction and a text become the string the model reads, and which part
of it is pooled. One home for the format and the pool span (as LLM2Vec's ``llm2vec.py`` does).

- ``e5`` (E5-mistral): ``Instruct: {instruction}\\nQuery: {text}``; texts without an instruction
  (documents of asymmetric tasks) are fed as they are.
- ``llm2vec`` (LLM2Vec, which the paper builds on): ``[INST] {instruction}; {text} [/INST]`` and
  ``[INST] {text} [/INST]`` for models whose chat format uses ``[INST]`` (Mistral-7B-Instruct,
  Llama-2-chat). Other chat models get their own chat template's user turn around the same
  ``{instruction}; {text}`` split, as LLM2Vec does by hand for Llama-3, Gemma-2 and Qwen-2 (e.g.
  ``<|im_start|>user\\n{instruction}; {text}<|im_end|>``); a model without a chat template is an error.
- a custom :class:`~harness.config.TemplateSpec` (``instructed`` with ``{instruction}`` and ``{text}``,
  ``plain`` with ``{text}``).

The pooled span starts where ``{text}`` starts: the text and everything after it (LLM2Vec pools the
text and the closing `` [/INST]``); the instruction and the template's opening are context only
(with ``skip_instruction``; otherwise every token is pooled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config import TemplateSpec

TEXT = "{text}"
INSTRUCTION = "{instruction}"
LLM2VEC_SEPARATOR = "; "  # LLM2Vec's E5Data joins "{instruction}; {text}"


class TemplateError(ValueError):
    """A template cannot be built for this model; the message says why."""


@dataclass(frozen=True)
class Template:
    """A resolved input format."""

    instructed: str  # contains {instruction} then {text}
    plain: str  # contains {text}

    def render(self, text: str, instruction: str | None) -> tuple[str, int]:
        """The string fed to the model and the character where its pooled span starts."""
        template = self.instructed if instruction else self.plain
        before, after = template.split(TEXT, 1)
        if instruction:
            before = before.replace(INSTRUCTION, instruction)
        return before + text + after, len(before)


E5 = Template(instructed="Instruct: {instruction}\nQuery: {text}", plain=TEXT)
INST = Template(instructed="[INST] {instruction}; {text} [/INST]", plain="[INST] {text} [/INST]")


def resolve_template(setting: str | TemplateSpec, tokenizer: Any) -> Template:
    """The :class:`Template` a ``model.template`` setting names, for this tokenizer."""
    if isinstance(setting, TemplateSpec):
        return Template(instructed=setting.instructed, plain=setting.plain)
    if setting == "e5":
        return E5
    if setting == "llm2vec":
        chat = getattr(tokenizer, "chat_template", None)
        if isinstance(chat, str) and "[INST]" in chat:
            return INST
        opening, closing = chat_user_turn(tokenizer)
        return Template(
            instructed=f"{opening}{INSTRUCTION}{LLM2VEC_SEPARATOR}{TEXT}{closing}",
            plain=f"{opening}{TEXT}{closing}",
        )
    raise TemplateError(f"unknown template {setting!r}")


def chat_user_turn(tokenizer: Any) -> tuple[str, str]:
    """The opening and closing of one user turn in the tokenizer's chat template, without the
    system prompt some templates add: rendered around sentinel messages, the opening is what
    follows an assistant turn's closing up to the user's text, the closing what follows the text.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "model.template 'llm2vec' needs a chat template ([INST] or the model's own user turn); "
            "this tokenizer has none: use 'e5' or a custom template"
        )
    a, b, c = "\x00user-one\x00", "\x00assistant-two\x00", "\x00user-three\x00"
    try:
        rendered = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": a},
                {"role": "assistant", "content": b},
                {"role": "user", "content": c},
            ],
            tokenize=False,
        )
    except Exception as e:
        raise TemplateError(
            f"model.template 'llm2vec': the chat template cannot render a user turn: {e}"
        ) from None
    if not (rendered.find(a) < rendered.find(b) < rendered.find(c)) or rendered.find(a) < 0:
        raise TemplateError(
            "model.template 'llm2vec': the chat template drops or reorders messages"
        )
    between = rendered[rendered.index(b) + len(b) : rendered.index(c)]
    closing = rendered[rendered.index(c) + len(c) :]
    if not closing.strip() or not between.startswith(closing.rstrip()):
        raise TemplateError(
            "model.template 'llm2vec': cannot find this chat template's user turn (its turns do not "
            "close alike); give a custom template instead"
        )
    return between[len(closing.rstrip()) :].lstrip("\n") or "", closing.rstrip()
