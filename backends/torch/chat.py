"""Prompt rendering: dataset prompt -> the exact text (and token ids) the policy is conditioned on.

Chat-tuned tokenizers carry a Jinja chat template; base models often do not, so two built-in
templates cover them. The rendered text already holds every special token the template writes
(e.g. a BOS), so it is tokenized with `add_special_tokens=False`, as TRL does.
"""

from __future__ import annotations

from typing import Any

Prompt = str | list[dict[str, str]]

PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""'System: …\\nUser: …\\nAssistant:' for base models; the completion continues right after 'Assistant:'.
Newlines are written {{ '\\n' }}: transformers renders with trim_blocks=True, which eats a newline
that follows a block tag."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML (Qwen and many others); its markers are plain text unless the tokenizer has them as tokens."""

BUILTIN_TEMPLATES = {"plain": PLAIN_TEMPLATE, "chatml": CHATML_TEMPLATE}
TEMPLATE_CHOICES = ("auto", "tokenizer", *BUILTIN_TEMPLATES)


class ChatTemplateError(ValueError):
    """An unknown template name, or "tokenizer" for a tokenizer that has no template."""


def resolve_chat_template(tokenizer: Any, chat_template: str | None = "auto") -> str:
    """The Jinja source to use.

    "auto" (or None): the tokenizer's own template if it has one, else "plain". "tokenizer": the
    tokenizer's, an error if it has none. "plain" / "chatml": the built-ins. A string containing
    Jinja markup ("{%" or "{{") is used as the template itself.
    """
    own = tokenizer.chat_template
    if chat_template in (None, "auto"):
        return own or PLAIN_TEMPLATE
    if chat_template == "tokenizer":
        if not own:
            raise ChatTemplateError(f"chat_template='tokenizer', but {type(tokenizer).__name__} "
                                    f"'{tokenizer.name_or_path}' has no chat template; use 'plain' or 'chatml'")
        return own
    if chat_template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[chat_template]
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    raise ChatTemplateError(f"unknown chat_template {chat_template!r}; choose one of {TEMPLATE_CHOICES} "
                            "or pass a Jinja template string")


def to_messages(prompt: Prompt, *, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A plain-string prompt becomes one user message; `system_prompt` is prepended unless the
    conversation already starts with a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_prompt(tokenizer: Any, prompt: Prompt, *, system_prompt: str | None = None,
                  chat_template: str | None = "auto") -> str:
    """The prompt text, ending with the template's generation prompt (add_generation_prompt=True)."""
    return tokenizer.apply_chat_template(
        to_messages(prompt, system_prompt=system_prompt), chat_template=resolve_chat_template(tokenizer, chat_template),
        tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: list[Prompt], *, system_prompt: str | None = None,
                   chat_template: str | None = "auto", max_prompt_length: int | None = None) -> list[list[int]]:
    """Rendered and tokenized prompts (no padding). `max_prompt_length` keeps the last tokens, as
    TRL's left truncation does, so the generation prompt at the end survives."""
    texts = [render_prompt(tokenizer, p, system_prompt=system_prompt, chat_template=chat_template) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    return ids
