"""Prompts in, token ids out: chat templates and benchmark question files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ctcspec.errors import CtcspecError

BUILTIN_QUESTIONS = "builtin"
NAMED_BENCHES = (("mt_bench", "mt_bench/question.jsonl"), ("vicuna_bench", "vicuna_bench/question.jsonl"),
                 ("gsm8k", "gsm8k/test.jsonl"))
DEFAULT_DATA_DIR = "../shared/data"  # or $CTCSPEC_DATA: benchmark files are read in place, never copied


def resolve_bench(name_or_path: str, data_dir: str | Path | None = None) -> str:
    """A benchmark name (mt_bench, vicuna_bench, gsm8k: the test split) -> its question file under the
    data directory; 'builtin' and file paths pass through."""
    import os

    files = dict(NAMED_BENCHES)
    if name_or_path not in files:
        return name_or_path
    root = Path(data_dir or os.environ.get("CTCSPEC_DATA") or DEFAULT_DATA_DIR)
    path = root / files[name_or_path]
    if not path.is_file():
        raise CtcspecError(f"benchmark {name_or_path!r}: {str(path)!r} not found; point --data-dir or $CTCSPEC_DATA "
                           f"at the directory holding {files[name_or_path]}")
    return str(path)


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]


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
        raise CtcspecError("this model's tokenizer has no chat template; drop --chat to use raw prompts")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_questions(path: str | Path) -> list[Question]:
    """Read FastChat question jsonl ({"turns": [...]}) or GSM8K jsonl ({"question": ...})."""
    if str(path) == BUILTIN_QUESTIONS:
        text = resources.files("ctcspec").joinpath("data/demo_questions.jsonl").read_text()
        return _parse_questions(text, "built-in questions")
    path = Path(path)
    if not path.is_file():
        raise CtcspecError(f"question file {str(path)!r} does not exist")
    return _parse_questions(path.read_text(encoding="utf-8"), str(path))


def _parse_questions(text: str, source: str) -> list[Question]:
    questions = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtcspecError(f"{source} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise CtcspecError(f"{source} line {lineno}: expected a JSON object")
        if "turns" in record:
            turns = record["turns"]
        elif "question" in record:
            turns = [record["question"]]
        else:
            raise CtcspecError(f"{source} line {lineno}: needs a 'turns' list (FastChat) or a 'question' (GSM8K)")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise CtcspecError(f"{source} line {lineno}: 'turns' must be a non-empty list of non-empty strings")
        questions.append(Question(str(record.get("question_id", lineno)), str(record.get("category", "")),
                                  tuple(turns)))
    if not questions:
        raise CtcspecError(f"{source}: no questions found")
    return questions


def select_questions(questions: list[Question], per_category: int | None = None,
                     limit: int | None = None) -> list[Question]:
    """The first `per_category` questions of each category (file order kept), then the first `limit`."""
    for name, value in (("--per-category", per_category), ("--limit", limit)):
        if value is not None and value < 1:
            raise CtcspecError(f"{name} must be at least 1")
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] <= per_category:
                kept.append(q)
        questions = kept
    return questions[:limit] if limit is not None else questions
