"""Prompts in, token ids out: raw text or the model's chat template."""

from __future__ import annotations

from ctcspec.errors import CtcspecError


def require_prompt(text: str) -> str:
    if not text.strip():
        raise CtcspecError("the prompt is empty")
    return text


def encode(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; with `chat`, wrapped in the model's chat template as one user turn."""
    require_prompt(text)
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise CtcspecError("this model's tokenizer has no chat template, so it cannot take a conversation: use a raw "
                           "prompt (generate without --chat, or /v1/completions)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
