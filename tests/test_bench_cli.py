"""`ctcspec bench --out DIR` saves every question as it finishes, resumes after an interrupt to the same answers
as an unbroken run, never overwrites results without --resume; `ctcspec report` recomputes tables for a subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ctcspec.bench.run
from conftest import run_cli

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
QUESTIONS = ('{"question_id": 11, "category": "a", "turns": ["w1 w2 w3", "w4 w5"]}\n'
             '{"question_id": 12, "category": "a", "turns": ["w7 w8 w7 w8"]}\n'
             '{"question_id": 13, "category": "b", "turns": ["w9 w9 w9", "w3"]}\n')


@pytest.fixture
def bench(capsys, tiny_model_dir, tmp_path):
    """Run `ctcspec bench` on three small questions (vanilla, lookup and HF generate) into an out directory."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(QUESTIONS)

    def bench_into(out: Path, *extra: str):
        return run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(questions), "--drafters",
                       "vanilla,lookup", "--max-new-tokens", "10", "--out", str(out), *extra)
    return bench_into


def counting_questions(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """Count the questions run; raise KeyboardInterrupt when question number `interrupt_at` (1-based) starts."""
    original, calls = ctcspec.bench.run.run_question, []

    def run_question(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(ctcspec.bench.run, "run_question", run_question)
    return calls


def saved_tokens(out: Path) -> dict:
    lines = (out / "turns.jsonl").read_text().splitlines()
    return {(r["system"], r["question_id"], r["turn"]): r["tokens"] for r in map(json.loads, lines)}


def test_bench_out_is_checked_before_the_model_loads(bench, tmp_path, monkeypatch):
    def no_load(args):
        raise AssertionError("the model must not load")
    monkeypatch.setattr("ctcspec.cli.common.load_from_args", no_load)
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a directory"),
                         (tmp_path / "file" / "sub", "cannot create the directory")):
        code, _, err = bench(out)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "turns.jsonl").write_text('{"system": "vanilla"}\n')
    code, _, err = bench(tmp_path / "old")
    assert code == 2 and "pass --resume to continue that run, or choose a new --out" in err
    assert (tmp_path / "old" / "turns.jsonl").read_text() == '{"system": "vanilla"}\n'  # untouched


def test_bench_interrupted_then_resumed_equals_an_unbroken_run(bench, tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert bench(full)[0] == 0
    calls = counting_questions(monkeypatch, interrupt_at=3)
    code, out, err = bench(cut)
    assert code == 130 and "interrupted after 2 of 3 questions" in err
    report = json.loads((cut / "report.json").read_text())  # the report of the questions done
    assert report["meta"]["n_questions"] == 2 and report["meta"]["complete"] is False
    assert {r["question_id"] for r in report["turns"]["lookup"]} == {"11", "12"}
    assert "Interrupted: 2 of 3 questions" in (cut / "report.md").read_text()
    assert len(saved_tokens(cut)) == 3 * (2 + 1)  # 3 systems, 3 turns
    assert json.loads((cut / "run.json").read_text())["settings"]["systems"] == ["vanilla", "lookup", "hf_generate"]

    code, _, err = bench(cut)
    assert code == 2 and "pass --resume" in err
    code, _, err = bench(cut, "--resume", "--max-new-tokens", "8")
    assert code == 2 and "max_new_tokens 10 (now 8)" in err
    with open(cut / "turns.jsonl", "a") as f:
        f.write('{"system": "vanilla", "question_id": "13", "cat')  # a line cut short by a crash

    calls = counting_questions(monkeypatch)
    code, out, _ = bench(cut, "--resume")
    assert code == 0 and len(calls) == 1  # only question 13 ran again
    assert saved_tokens(cut) == saved_tokens(full)  # token for token, every system, question and turn
    resumed, unbroken = (json.loads((d / "report.json").read_text()) for d in (cut, full))
    assert resumed["meta"]["n_questions"] == 3 and resumed["meta"]["complete"] is True
    for name in unbroken["turns"]:
        assert [(r["question_id"], r["turn"], r["text"]) for r in resumed["turns"][name]] == \
               [(r["question_id"], r["turn"], r["text"]) for r in unbroken["turns"][name]]
    assert resumed["systems"]["lookup"]["outputs_differing_from_vanilla"] == 0
    answers = [json.loads(line)["question_id"] for line in (cut / "answers" / "lookup.jsonl").read_text().splitlines()]
    assert answers == ["11", "12", "13"]
    assert (cut / "plot.png").exists() and "time-weighted" in (cut / "report.md").read_text()


def test_bench_report_records_speedups_and_the_machine(bench, tmp_path, capsys):
    code, out, _ = bench(tmp_path / "out")
    assert code == 0 and "time-wtd" in out and "loops" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["systems"]["lookup"]["time_weighted_speedup_vs_vanilla"] > 0
    assert data["systems"]["vanilla"]["time_weighted_speedup_vs_vanilla"] == pytest.approx(1.0)
    meta = data["meta"]
    assert {"commit", "torch", "transformers", "cpu_model", "threads", "kernels"} <= meta.keys()
    record = json.loads((tmp_path / "out" / "turns.jsonl").read_text().splitlines()[0])
    assert {"system", "question_id", "category", "turn", "new_tokens", "steps", "seconds", "draft_s", "verify_s",
            "bookkeeping_s", "tokens", "text"} == record.keys()
    code, out, _ = run_cli(capsys, "report", str(tmp_path / "out"), "--per-category", "1", "--limit", "1")
    assert code == 0 and "1 of 3 questions" in out and "draft%" in out


def test_report_of_a_subset_of_the_committed_reports(capsys):
    code, out, err = run_cli(capsys, "report", str(RESULTS / "mt_bench_3pc"), "--per-category", "1")
    assert code == 0, err
    assert "8 of 24 questions" in out and "time-wtd" in out and "loops" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:10]}
    assert rows["vanilla"][5] == "1.00x"  # vanilla's time-weighted speedup over itself
    code, out, err = run_cli(capsys, "report", str(RESULTS / "gsm8k_50"), "--limit", "16")
    assert code == 0 and "16 of 50 questions" in out, err
    code, out, _ = run_cli(capsys, "report", str(RESULTS / "gsm8k_50"))
    assert code == 0 and "time-wtd" in out and "50 questions" in out


def test_bench_sampling_checks_the_loglik_and_resume_refuses_other_settings(bench, tmp_path, capsys):
    out = tmp_path / "sampled"
    code, table, err = bench(out, "--limit", "1", "--max-new-tokens", "8", "--temperature", "1.0")
    assert code == 0, err
    header = table.splitlines()[0]
    assert "loglik/token" in header and "differ vs HF" in header
    data = json.loads((out / "report.json").read_text())
    for row in data["systems"].values():  # every system samples: checked by likelihood and against HF's same-seed draw
        assert row["loglik_per_token"] < 0 and "outputs_differing_from_vanilla" not in row
        assert isinstance(row["outputs_differing_from_hf_generate"], int)
    assert data["meta"]["settings_in_effect"] == {"do_sample": True, "repetition_penalty": 1.0, "temperature": 1.0,
                                        "top_k": 50, "top_p": 1.0, "min_p": None}
    assert data["meta"]["seed"] == 0
    records = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 and all(r["loglik"] <= 0 for r in records)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["generation_settings"] == {"do_sample": True, "temperature": 1.0} and settings["seed"] == 0
    assert "sampling, seed 0 (" in (out / "report.md").read_text() and "loglik/token" in (out / "report.md").read_text()
    code, shown, _ = run_cli(capsys, "report", str(out))
    assert code == 0 and "sampling, seed 0 (" in shown and "loglik/token" in shown

    code, _, err = bench(out, "--limit", "1", "--max-new-tokens", "8", "--temperature", "0.5", "--resume")
    assert code == 2 and "other settings: generation_settings" in err and "'temperature': 0.5" in err
    code, _, err = bench(out, "--limit", "1", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "1",
                         "--resume")
    assert code == 2 and "seed 0 (now 1)" in err
