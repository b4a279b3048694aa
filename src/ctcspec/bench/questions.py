"""Benchmark questions: FastChat question jsonl (multi-turn), GSM8K jsonl, the built-in demo set, and
the named benchmarks read in place from the data directory (never copied)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ctcspec.errors import CtcspecError, read_text_file

BUILTIN_QUESTIONS = "builtin"
NAMED_BENCHES = {"mt_bench": "mt_bench/question.jsonl", "vicuna_bench": "vicuna_bench/question.jsonl",
                 "gsm8k": "gsm8k/test.jsonl"}
DEFAULT_DATA_DIR = "../shared/data"  # or $CTCSPEC_DATA


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]


def resolve_bench(name_or_path: str, data_dir: str | Path | None = None) -> str:
    """A benchmark name (mt_bench, vicuna_bench, gsm8k: the test split) -> its question file under the
    data directory; 'builtin' and file paths pass through."""
    files = NAMED_BENCHES
    if name_or_path not in files:
        return name_or_path
    root = Path(data_dir or os.environ.get("CTCSPEC_DATA") or DEFAULT_DATA_DIR)
    path = root / files[name_or_path]
    if not path.is_file():
        raise CtcspecError(f"benchmark {name_or_path!r}: {str(path)!r} not found; point --data-dir or $CTCSPEC_DATA "
                           f"at the directory holding {files[name_or_path]}")
    return str(path)


def load_questions(path: str | Path) -> list[Question]:
    """Read FastChat question jsonl ({"turns": [...]}) or GSM8K jsonl ({"question": ...})."""
    if str(path) == BUILTIN_QUESTIONS:
        text = resources.files("ctcspec").joinpath("data/demo_questions.jsonl").read_text()
        return _parse_questions(text, "built-in questions")
    return _parse_questions(read_text_file(path, "question file"), str(path))


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
