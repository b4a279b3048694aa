"""The benchmark's arithmetic and its saved progress: speedups are per-turn ratios (gamma) and total tokens over
total seconds (time-weighted), lossy output and looping answers are counted, not hidden; turns.jsonl keeps every
finished question and nothing else."""

import json
import re

import pytest
import torch

from conftest import tiny_model
from ctcspec.backends import make_backend
from ctcspec.bench.questions import Question
from ctcspec.bench.report import environment, markdown_report
from ctcspec.bench.run import TurnRecord, hf_generate, output_loglik, system_runners, turn_seed
from ctcspec.bench.store import RECORD_KEYS, BenchStore, finished_questions, read_records
from ctcspec.bench.summary import (
    HF,
    describe_settings,
    ends_in_loop,
    format_table,
    per_category,
    report_of,
    subset_report,
)
from ctcspec.decoding import settings_in_effect
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.drafters.vanilla import VanillaDrafter
from ctcspec.errors import CtcspecError


def records(system, rows, question_id="q"):
    """Saved per-turn records of one system: (category, tokens, steps, seconds) per turn."""
    return [TurnRecord(question_id, cat, 0, toks, steps, secs).to_dict(system, " ".join(map(str, toks)))
            for cat, toks, steps, secs in rows]


def test_speedup_is_the_mean_of_per_turn_ratios_and_differences_are_counted():
    vanilla = records("vanilla", [("a", [1, 2, 3, 4], 4, 2.0), ("b", [5, 6], 2, 1.0)])
    drafted = records("lookup", [("a", [1, 2, 3, 4], 2, 1.0), ("b", [5, 7], 1, 0.25)])
    report = report_of(vanilla + drafted, ["vanilla", "lookup"])
    row = report["systems"]["lookup"]
    assert row["beta"] == pytest.approx(6 / 3)
    assert row["speedup_vs_vanilla"] == pytest.approx((2.0 + 4.0) / 2)
    assert row["median_speedup_vs_vanilla"] == pytest.approx(3.0)
    assert row["time_weighted_speedup_vs_vanilla"] == pytest.approx((6 / 1.25) / (6 / 3.0))  # 2.4, not gamma's 3
    assert row["outputs_differing_from_vanilla"] == 1
    assert report["systems"]["vanilla"]["outputs_differing_from_vanilla"] == 0
    assert "tokens" not in report["turns"]["lookup"][0] and "draft_s" in report["turns"]["lookup"][0]
    cats = per_category(report)
    assert cats["lookup"]["a"] == pytest.approx({"beta": 2.0, "speedup_vs_vanilla": 2.0})
    assert cats["lookup"]["b"]["speedup_vs_vanilla"] == pytest.approx(4.0)


def test_sampled_runs_report_loglik_per_token_and_differences_from_hf_instead_of_vanilla():
    vanilla = records("vanilla", [("a", [1, 2, 3, 4], 4, 2.0), ("b", [5, 6], 2, 1.0)])
    drafted = records("lookup", [("a", [1, 2, 3, 4], 2, 1.0), ("b", [5, 7], 1, 0.25)])
    hf = records(HF, [("a", [1, 2, 3, 4], 4, 2.0), ("b", [5, 6], 2, 1.0)])
    for record, loglik in zip(vanilla + drafted + hf, (-4.0, -2.0, -6.0, -3.0, -4.0, -2.0), strict=True):
        record["loglik"] = loglik
    report = report_of(vanilla + drafted + hf, ["vanilla", "lookup", HF])
    row = report["systems"]["lookup"]
    assert row["loglik_per_token"] == pytest.approx(-9.0 / 6) and "outputs_differing_from_vanilla" not in row
    assert row[f"outputs_differing_from_{HF}"] == 1
    assert report["systems"]["vanilla"][f"outputs_differing_from_{HF}"] == 0
    assert row["speedup_vs_vanilla"] == pytest.approx(3.0)  # beta and gamma as when greedy
    header, _, vanilla_row, lookup_row, _ = format_table(report).splitlines()
    assert header.split()[-5:] == ["loglik/token", "differ", "vs", "HF", "loops"]
    assert vanilla_row.split()[-3:] == ["-1.000", "0", "0"] and lookup_row.split()[-3:] == ["-1.500", "1", "0"]
    markdown = markdown_report(report, {"settings_in_effect": {"do_sample": True, "temperature": 0.7}, "seed": 5})
    assert "sampling, seed 5 (temperature 0.7)" in markdown
    assert "| loglik/token | differ from HF generate | loops |" in markdown
    assert "| lookup | 2.00 |" in markdown and "| -1.500 | 1 | 0 |" in markdown


def test_describe_settings():
    assert describe_settings(None, None) == "greedy"  # a report from before sampling existed
    assert describe_settings({"do_sample": False, "repetition_penalty": 1.3}, 0) == "greedy (repetition_penalty 1.3)"
    assert describe_settings({"do_sample": True, "temperature": 1.0, "min_p": None}, 7) == \
        "sampling, seed 7 (temperature 1.0)"


def test_turn_seed_depends_on_the_seed_question_and_turn_only():
    seeds = {turn_seed(s, q, t) for s in (0, 1) for q in ("1", "2") for t in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)
    assert turn_seed(3, "q", 1) == turn_seed(3, "q", 1) == 1247513057  # stable across processes and versions


def test_output_loglik_is_the_tempered_teacher_forced_log_likelihood():
    model = tiny_model("llama")
    prompt, tokens = [1, 5, 6, 7], [8, 9, 10]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    expected = sum(float(torch.log_softmax(logits[len(prompt) - 1 + i] / 0.5, dim=-1)[t]) for i, t in enumerate(tokens))
    assert output_loglik(model, prompt, tokens, 0.5) == pytest.approx(expected, abs=1e-4)
    assert output_loglik(model, prompt, [], 0.5) == 0.0


def test_settings_in_effect_merge_the_model_generation_config():
    model = tiny_model("qwen2")
    model.generation_config.temperature, model.generation_config.top_p = 0.7, 0.8
    assert settings_in_effect(model, {"do_sample": False}) == {"do_sample": False, "repetition_penalty": 1.0}
    assert settings_in_effect(model, {"do_sample": True, "temperature": 1.2}) == {
        "do_sample": True, "repetition_penalty": 1.0, "temperature": 1.2, "top_k": 50, "top_p": 0.8, "min_p": None}
    with pytest.raises(CtcspecError, match="invalid generation settings"):
        settings_in_effect(model, {"do_sample": True, "temperature": -1.0})


def test_hf_runner_applies_the_model_generation_config_like_the_engines():
    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 1.3  # as a model's generation_config.json may ship it
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    runners = system_runners(make_backend(model, "hf"), {"vanilla": VanillaDrafter(), "lookup": LookupDrafter()})
    greedy = hf_generate(model, prompt, 16).tokens
    assert runners[HF](prompt, 16, 0).tokens == greedy == runners["vanilla"](prompt, 16, 0).tokens
    assert runners["lookup"](prompt, 16, 0).tokens == greedy
    model.generation_config.repetition_penalty = 1.0
    assert hf_generate(model, prompt, 16).tokens != greedy  # the model's penalty was applied
    sampled = system_runners(make_backend(model, "hf"), {}, settings={"do_sample": True, "temperature": 1.0})
    assert sampled[HF](prompt, 16, 4).tokens == sampled[HF](prompt, 16, 4).tokens != sampled[HF](prompt, 16, 5).tokens


def test_turn_records_carry_every_saved_field():
    assert set(TurnRecord("q", "c", 0, [1], 1, 0.1).to_dict("vanilla", "w1")) == RECORD_KEYS


def test_ends_in_loop():
    assert ends_in_loop("Intro. " + "the cat sat on the mat, " * 5)
    assert not ends_in_loop("A plain answer that says one thing and then stops without repeating itself.")
    assert not ends_in_loop("ab" * 3)  # pieces shorter than 8 characters do not count


def test_tables_show_time_weighted_speedup_and_loops_and_dash_for_missing_timings():
    loop = "x " + "one two three " * 4
    old = [{"question_id": "1", "category": "c", "turn": 0, "new_tokens": 4, "steps": s, "seconds": 1.0,
            "text": text} for s, text in ((4, "fine"), (2, loop))]  # an older report: no draft_s, no token ids
    report = {"systems": {}, "turns": {"vanilla": old[:1], "lookup": old[1:]}}
    table = format_table(subset_report(report))
    header, _, vanilla, lookup = table.splitlines()
    assert "time-wtd" in header and header.split()[-1] == "loops"
    assert lookup.split()[-1] == "1" and vanilla.split()[-1] == "0"
    assert lookup.split()[-5:-3] == ["-", "-"]  # draft% and bookkeep% unknown
    assert lookup.split()[-2] == "1"  # the text differs


def test_subset_takes_the_first_questions_per_category_then_the_limit():
    rows = []
    for qid, cat in (("1", "a"), ("2", "a"), ("3", "b"), ("4", "b"), ("5", "c")):
        rows += [{**r, "turn": t} for t, r in enumerate(records("vanilla", [(cat, [1, 2], 2, 1.0)] * 2, qid))]
    full = report_of(rows, ["vanilla"])
    full["systems"]["vanilla"]["saved_only"] = 7
    sub = subset_report(full, per_category=1, limit=2)
    assert [r["question_id"] for r in sub["turns"]["vanilla"]] == ["1", "1", "3", "3"]
    assert sub["systems"]["vanilla"]["turns"] == 4 and "saved_only" not in sub["systems"]["vanilla"]
    assert subset_report(full)["systems"]["vanilla"]["saved_only"] == 7  # all questions: the saved rows kept
    with pytest.raises(CtcspecError, match="--limit"):
        subset_report(full, limit=0)


QUESTIONS = [Question("1", "a", ("t1", "t2")), Question("2", "b", ("t1",))]
SYSTEMS = ["vanilla", "lookup"]


def question_records(question):
    return [TurnRecord(question.question_id, question.category, t, [1, 2], 2, 1.0).to_dict(s, "w1 w2")
            for t in range(len(question.turns)) for s in SYSTEMS]


def test_store_keeps_finished_questions_and_drops_a_cut_line_or_an_unfinished_question(tmp_path):
    settings = {"max_new_tokens": 12}
    store = BenchStore.open(tmp_path, settings, QUESTIONS, SYSTEMS)
    store.append(question_records(QUESTIONS[0]))
    with open(tmp_path / "turns.jsonl", "a") as f:  # a crash while writing question 2
        f.write(json.dumps(question_records(QUESTIONS[1])[0]) + "\n" + '{"system": "lookup", "quest')
    assert len(read_records(tmp_path / "turns.jsonl")) == 5
    assert finished_questions(read_records(tmp_path / "turns.jsonl"), QUESTIONS, SYSTEMS) == 1
    resumed = BenchStore.open(tmp_path, settings, QUESTIONS, SYSTEMS, resume=True)
    assert resumed.n_done == 1 and len(resumed.records) == 4
    assert read_records(tmp_path / "turns.jsonl") == resumed.records  # the broken tail is gone from the file
    resumed.append(question_records(QUESTIONS[1]))
    again = BenchStore.open(tmp_path, settings, QUESTIONS, SYSTEMS, resume=True)
    assert again.n_done == 2 and again.report()["systems"]["lookup"]["turns"] == 3


def test_store_refuses_overwriting_and_other_settings(tmp_path):
    store = BenchStore.open(tmp_path, {"max_new_tokens": 12, "systems": SYSTEMS}, QUESTIONS, SYSTEMS)
    store.append(question_records(QUESTIONS[0]))
    with pytest.raises(CtcspecError, match="pass --resume .* or choose a new --out"):
        BenchStore.open(tmp_path, {"max_new_tokens": 12, "systems": SYSTEMS}, QUESTIONS, SYSTEMS)
    with pytest.raises(CtcspecError, match=r"other settings: max_new_tokens 12 \(now 16\)"):
        BenchStore.open(tmp_path, {"max_new_tokens": 16, "systems": SYSTEMS}, QUESTIONS, SYSTEMS, resume=True)
    (tmp_path / "run.json").unlink()
    with pytest.raises(CtcspecError, match="has no run.json"):
        BenchStore.open(tmp_path, {"max_new_tokens": 12}, QUESTIONS, SYSTEMS, resume=True)


@pytest.mark.parametrize("make", ["file", "under_file"])
def test_store_rejects_an_out_that_is_not_a_directory(tmp_path, make):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if make == "file" else tmp_path / "f" / "sub"
    with pytest.raises(CtcspecError, match="--out"):
        BenchStore.open(out, {}, QUESTIONS, SYSTEMS)


def test_environment_names_commit_versions_and_cpu():
    env = environment()
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])
    assert env["torch"] and env["transformers"] and env["threads"] >= 1
    assert "cpu_model" in env
