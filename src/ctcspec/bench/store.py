"""A bench output directory while the run goes on. DIR/run.json holds the run's settings (written before the
model loads); DIR/turns.jsonl holds one JSON record per turn (run.TurnRecord.to_dict), appended a whole question
at a time, so an interrupted run keeps every question it finished and `bench --resume` goes on from there.
Results already in DIR are never overwritten without --resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctcspec.bench.questions import Question
from ctcspec.bench.summary import report_of
from ctcspec.errors import CtcspecError

RUN_FILE = "run.json"
TURNS_FILE = "turns.jsonl"
REPORT_FILE = "report.json"
RECORD_KEYS = frozenset({"system", "question_id", "category", "turn", "new_tokens", "steps", "seconds", "draft_s",
                         "verify_s", "bookkeeping_s", "tokens", "text"})


def writable_dir(out: Path) -> Path:
    """`out` as an existing directory (created with its parents); a one-line CtcspecError when it is a file or
    cannot be created."""
    if out.exists() and not out.is_dir():
        raise CtcspecError(f"--out {str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtcspecError(f"--out {str(out)!r}: cannot create the directory ({exc.strerror})") from None
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` all at once (a crash leaves the old file or the new one, never half of one);
    a one-line CtcspecError when the directory is not writable."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise CtcspecError(f"cannot write {str(path)!r}: {exc.strerror}") from None


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_records(path: Path) -> list[dict]:
    """The records of a turns.jsonl up to its first line that is not a whole record (such as a line cut short
    by a crash); none when the file does not exist."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(record, dict) or not RECORD_KEYS <= record.keys():
            break
        records.append(record)
    return records


def finished_questions(records: list[dict], questions: list[Question], systems: list[str]) -> int:
    """How many leading questions every system finished. Invariant of a turns.jsonl: question i's records are
    one block of len(systems) * len(turns) records, each (system, turn) once, all with its question id; counting
    stops at the first block that is not whole."""
    done = start = 0
    for question in questions:
        size = len(systems) * len(question.turns)
        block = records[start: start + size]
        expected = {(s, t) for s in systems for t in range(len(question.turns))}
        if (len(block) != size or {(r["system"], r["turn"]) for r in block} != expected
                or any(r["question_id"] != question.question_id for r in block)):
            break
        done, start = done + 1, start + size
    return done


def records_size(questions: list[Question], systems: list[str]) -> int:
    """How many records the given questions make."""
    return len(systems) * sum(len(q.turns) for q in questions)


def _saved_settings(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CtcspecError(f"--resume: {str(path)!r} is not a bench run's settings file") from None


def check_same_settings(saved: dict, settings: dict, out: Path) -> None:
    """A CtcspecError naming every setting that differs from the saved run's."""
    differ = [f"{key} {saved.get(key)!r} (now {settings.get(key)!r})"
              for key in sorted(saved.keys() | settings.keys()) if saved.get(key) != settings.get(key)]
    if differ:
        raise CtcspecError(f"--resume: {str(out)!r} was run with other settings: " + "; ".join(differ)
                           + ". Rerun with the saved settings, or choose a new --out")


class BenchStore:
    """The saved progress of one bench run. Invariant: `records` (and DIR/turns.jsonl) are exactly the records
    of questions[:n_done], every system and every turn, in run order."""

    def __init__(self, out: Path, questions: list[Question], systems: list[str], records: list[dict], n_done: int):
        self.out, self.questions, self.systems, self.records, self.n_done = out, questions, systems, records, n_done

    @classmethod
    def open(cls, out: Path, settings: dict, questions: list[Question], systems: list[str],
             resume: bool = False) -> BenchStore:
        """Check and prepare `out` before anything runs: without `resume` it must hold no results yet; with it,
        the saved settings must equal `settings` and the finished questions are kept (a cut-short line or an
        unfinished question is dropped, to be redone). Writes run.json and the kept turns.jsonl."""
        out = writable_dir(out)
        turns = out / TURNS_FILE
        settings = json.loads(json.dumps(settings))  # compared as they read back
        if not resume:
            if (turns.exists() and turns.stat().st_size > 0) or (out / REPORT_FILE).exists():
                raise CtcspecError(f"{str(out)!r} already holds bench results: pass --resume to continue that run, "
                                   "or choose a new --out")
            records, n_done = [], 0
        else:
            saved = _saved_settings(out / RUN_FILE)
            if saved is None and (turns.exists() or (out / REPORT_FILE).exists()):
                raise CtcspecError(f"--resume: {str(out)!r} has no {RUN_FILE}, so its results cannot be continued; "
                                   "choose a new --out")
            if saved is not None:
                check_same_settings(saved, settings, out)
            records = read_records(turns)
            n_done = finished_questions(records, questions, systems)
            records = records[: records_size(questions[:n_done], systems)]
        _write_atomic(out / RUN_FILE, json.dumps({"settings": settings}, indent=2) + "\n")
        _write_atomic(turns, _lines(records))
        return cls(out, questions, systems, records, n_done)

    def append(self, records: list[dict]) -> None:
        """Save one finished question's records (all systems, all turns), flushed to disk before returning."""
        with open(self.out / TURNS_FILE, "a", encoding="utf-8") as f:
            f.write(_lines(records))
            f.flush()
            os.fsync(f.fileno())
        self.records += records
        self.n_done += 1

    def report(self) -> dict:
        """The report ({"systems", "turns"}) of the finished questions; at least one must be."""
        return report_of(self.records, self.systems)
