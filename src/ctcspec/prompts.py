"""Prompts in, token ids out: raw text or the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path

from ctcspec.errors import CtcspecError, read_text_file


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


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-empty line, or, for a .jsonl file, one JSON object with a "prompt" string
    per non-empty line. A line that is not one is a CtcspecError naming it."""
    text = read_text_file(path, "prompts file")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if Path(path).suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtcspecError(f"prompts file {str(path)!r} line {number}: not JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CtcspecError(f"prompts file {str(path)!r} line {number}: expected an object with a non-empty "
                               '"prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise CtcspecError(f"prompts file {str(path)!r} has no prompts")
    return prompts
