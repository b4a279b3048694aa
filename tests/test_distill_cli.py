"""Distillation inputs and the distill / train / generate --drafter ctc commands end to end."""

from __future__ import annotations

import json

import pytest

from conftest import hf_greedy, run_cli
from ctcspec.bench.questions import Question, select_questions
from ctcspec.errors import CtcspecError
from ctcspec.training.distill import read_prompt_file, read_samples, templated_prompts


def test_prompt_files_of_every_format(tmp_path):
    (tmp_path / "fc.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["first", "second"]}) + "\n")
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n\n")
    (tmp_path / "p.txt").write_text("one prompt\n\n another \n")
    assert [p.text for p in read_prompt_file(tmp_path / "fc.jsonl")] == ["first"]
    assert [p.text for p in read_prompt_file(tmp_path / "g.jsonl")] == ["q?"]
    assert [p.text for p in read_prompt_file(tmp_path / "p.txt")] == ["one prompt", "another"]
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(CtcspecError, match="line 1"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(CtcspecError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("path", ["data/mt_bench/question.jsonl", "data/gsm8k/test.jsonl",
                                  "data/vicuna_bench/question.jsonl"])
def test_evaluation_sets_are_refused(tmp_path, path):
    target = tmp_path / path
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(CtcspecError, match="evaluation set"):
        read_prompt_file(target)


def test_templated_prompts_are_distinct():
    prompts = templated_prompts()
    assert len({p.text for p in prompts}) == len(prompts) > 1000


def test_select_questions_per_category_then_limit():
    qs = [Question(str(i), c, ("t",)) for i, c in enumerate("aaabbbcc")]
    assert [q.question_id for q in select_questions(qs, per_category=2)] == ["0", "1", "3", "4", "6", "7"]
    assert [q.question_id for q in select_questions(qs, per_category=1, limit=2)] == ["0", "3"]
    with pytest.raises(CtcspecError, match="--per-category"):
        select_questions(qs, per_category=0)


def test_distill_train_generate_end_to_end(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i}" for i in range(3, 43)) + "\n")
    data = tmp_path / "data"
    code, _, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", 24,
                           "--batch-size", 16, "--limit", 20, "--out", data)
    assert code == 0, err
    assert len(read_samples(data)) == 20
    with (data / "samples.jsonl").open("a") as f:
        f.write('{"index": 25, "prompt_len": 3, "ids": [1, 2')  # a run killed mid-write
    code, _, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", 24,
                           "--batch-size", 16, "--out", data)  # resumes: only the 20 new prompts are answered
    assert code == 0, err
    samples = read_samples(data)
    assert sorted(s["index"] for s in samples) == list(range(40))

    drafter = tmp_path / "drafter"
    code, out, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", data, "--out", drafter, "--steps", 8,
                             "--batch-size", 8, "--draft-vocab", 40, "--num-slots", 4, "--target-tokens", 3,
                             "--eval-every", 4, "--checkpoint-every", 4)
    assert code == 0, err
    assert json.loads(out)["steps"] == 8
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", data, "--out", drafter, "--steps", 8)
    assert code == 2 and "--resume" in err  # never overwrite a run silently

    code, out, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "w5 w6 w7 w5", "--json",
                             "--drafter-path", drafter, "--tree-budget", 5, "--max-new-tokens", 16)
    assert code == 0, err
    record = json.loads(out)
    assert record["drafter"] == "ctc+lookup"  # the default when a trained CTC drafter is given
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.eos_token_id = None
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("w5 w6 w7 w5")["input_ids"]
    assert record["output_ids"] == hf_greedy(model, ids, 16)

    code, _, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "w5", "--drafter-path", drafter,
                           "--tree-budget", 0)
    assert code == 2 and "--tree-budget" in err


def test_distill_on_the_batched_engine_equals_hf_generate(capsys, tmp_path, tiny_model_dir):
    """--engine ctcspec (batch.py, prompt lookup, continuous batching) answers as HF generate's batches do."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i}" * (1 + i % 3) for i in range(3, 15)) + "\n")
    answers = {}
    for engine in ("hf", "ctcspec"):
        code, out, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--prompts", prompts, "--engine",
                                 engine, "--max-new-tokens", 20, "--batch-size", 5, "--out", tmp_path / engine,
                                 *(["--check-float32", 4] if engine == "ctcspec" else []))
        assert code == 0, err
        answers[engine] = {s["index"]: s["ids"] for s in read_samples(tmp_path / engine)}
    assert answers["ctcspec"] == answers["hf"] and len(answers["hf"]) == 12
    assert json.loads(out.splitlines()[-1])["float32_check"]["identical"] == 1.0


def test_distill_and_train_user_errors(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "distill", "--model", tiny_model_dir, "--out", tmp_path / "d")
    assert code == 2 and "--prompts" in err
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tmp_path / "nothing", "--out",
                           tmp_path / "x")
    assert code == 2 and "no distilled data" in err
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tmp_path, "--out", tmp_path / "x",
                           "--resume")
    assert code == 2
    code, _, err = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "w5", "--drafter", "ctc")
    assert code == 2 and "--drafter-path" in err
