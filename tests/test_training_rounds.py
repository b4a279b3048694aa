"""Training rounds (issue 14): round-sliced prompts, warm starts (--init-from), distillation under a time limit
with a float32 check, training on two processes, and the GPU round's CPU dry run (scripts/gpu_round.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_cli, tiny_model
from ctcspec.cli import main
from ctcspec.models import DEFAULT_MODEL
from ctcspec.modules import KINDS
from ctcspec.modules import module_config as module_config_of
from ctcspec.modules.ctc import TRAINING_ONLY, CTCConfig
from ctcspec.modules.files import read_config, shipped_drafter_dir
from ctcspec.modules.layers import DraftLayer, base_rope_theta, copy_base_layer
from ctcspec.training.data import read_data
from ctcspec.training.distill import read_samples, round_slice, styled_prompts, templated_prompts
from ctcspec.training.store import read_manifest
from ctcspec.training.train import TrainConfig, module_config, warm_start_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CTC = ("--num-slots", 4, "--target-tokens", 3, "--draft-vocab", 40, "--batch-size", 8, "--eval-every", 2,
            "--final-eval-samples", 4)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_model_dir):
    """40 distilled tiny-model answers, and a CTC and a Medusa drafter trained on them for a few steps."""
    root = tmp_path_factory.mktemp("rounds")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i}" for i in range(3, 43)) + "\n")
    assert main([str(a) for a in ("distill", "--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens",
                                  24, "--batch-size", 16, "--out", root / "data")]) == 0
    for kind in ("ctc", "medusa"):
        assert main([str(a) for a in ("train", "--model", tiny_model_dir, "--kind", kind, "--data", root / "data",
                                      "--out", root / kind, "--steps", 4, *TINY_CTC)]) == 0
    return root


def test_rounds_take_disjoint_prompts_of_each_source():
    pool = styled_prompts()
    rounds = [round_slice(pool, r, 1000) for r in range(3)]
    texts = [{p.text for p in chosen} for chosen in rounds]
    assert all(len(t) == 1000 for t in texts)
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2]) and not (texts[0] & texts[2])
    assert round_slice(pool, 1, 1000) == rounds[1]  # the same round is the same prompts
    assert len({p.text for p in pool}) == len(pool)
    assert not {p.text for p in pool} & {p.text for p in templated_prompts()}  # new to earlier rounds' data
    assert round_slice(pool, len(pool) // 1000 + 1, 1000) == []  # used up by earlier rounds


def test_distill_round_options_and_errors(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1}" for i in range(3, 23)) + "\n")
    base = ("distill", "--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", 8, "--batch-size", 4)
    code, out, err = run_cli(capsys, *base, "--round", 1, "--round-size", 8, "--out", tmp_path / "r1")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["answered"] == 8 and stats["left"] == 0 and stats["answer_tokens"] > 0
    code, _, err = run_cli(capsys, *base, "--round", 0, "--round-size", 8, "--out", tmp_path / "r0")
    assert code == 0, err
    first = {tuple(s["ids"][:s["prompt_len"]]) for s in read_samples(tmp_path / "r0")}
    second = {tuple(s["ids"][:s["prompt_len"]]) for s in read_samples(tmp_path / "r1")}
    assert len(first) == len(second) == 8 and not first & second
    code, _, err = run_cli(capsys, *base, "--round", 0, "--round-size", 8, "--out", tmp_path / "r1")
    assert code == 2 and "holds answers to other prompts" in err  # never mixed under the wrong indices
    for extra, message in ((("--round", 1), "go together"), (("--round", 3, "--round-size", 8), "no prompts left"),
                           (("--round", 0, "--round-size", 4, "--limit", 2), "give one"),
                           (("--check-float32", 2), "--dtype bfloat16")):
        code, _, err = run_cli(capsys, *base, *extra, "--out", tmp_path / "bad")
        assert code == 2 and message in err and "Traceback" not in err


def test_distill_time_limit_keeps_answers_and_a_rerun_finishes(capsys, tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"w{i} w{i + 1}" for i in range(3, 15)) + "\n")
    base = ("distill", "--model", tiny_model_dir, "--prompts", prompts, "--max-new-tokens", 8, "--batch-size", 4,
            "--out", tmp_path / "d")
    code, out, err = run_cli(capsys, *base, "--time-limit-s", 1e-6)  # past before the first batch
    assert code == 0, err
    assert json.loads(out)["answered"] == 0 and json.loads(out)["left"] == 12
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    assert json.loads(out)["answered"] == 12 and len(read_samples(tmp_path / "d")) == 12
    code, out, err = run_cli(capsys, *base[:-1], tmp_path / "bf16", "--dtype", "bfloat16", "--check-float32", 4)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["answered"] == 12 and stats["dtype"] == "torch.bfloat16"
    check = stats["float32_check"]
    assert check["answers"] == 4 and 0 <= check["identical"] <= 1 and 0 <= check["tokens_before_first_difference"] <= 1
    code, _, err = run_cli(capsys, *base, "--time-limit-s", 0)
    assert code == 2 and "--time-limit-s" in err


def test_warm_start_continues_the_saved_drafter(capsys, tmp_path, tiny_model_dir, tiny_data):
    init = tiny_data / "ctc"
    code, out, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                             tmp_path / "warm", "--steps", 2, "--lr", 0, "--init-from", init, *TINY_CTC)
    assert code == 0, err
    assert json.loads(out)["warm_start"] == {"from": str(init), "rounds": 2, "earlier_steps": 4,
                                             "earlier_train_tokens": json.loads((init / "config.json").read_text())
                                             ["training"]["train_tokens"]}
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "warm" / "model.safetensors")
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)  # lr 0: unchanged
    code, out, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                             tmp_path / "fresh", "--steps", 2, "--lr", 0, *TINY_CTC)
    fresh = load_file(tmp_path / "fresh" / "model.safetensors")
    assert code == 0 and not all((before[k] == fresh[k]).all() for k in before if k != "vocab_ids")
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                           tmp_path / "other", "--steps", 2, "--init-from", init, *TINY_CTC[:-6], "--num-slots", 5)
    assert code == 2 and "num_slots 4 (these options give 5)" in err
    for given, kept in ((["--slot-attention", "causal"], "causal"), ([], "causal")):  # then the causal one goes on
        code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                               tmp_path / f"causal{len(given)}", "--steps", 2, "--lr", 0, "--init-from", init,
                               *TINY_CTC, *given)
        assert code == 0, err
        assert read_config(tmp_path / f"causal{len(given)}")["draft"]["slot_attention"] == kept
        init = tmp_path / "causal2"
    assert load_file(init / "model.safetensors").keys() == before.keys()  # the same parameters, attending causally
    init = tiny_data / "ctc"
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--kind", "hydra", "--data", tiny_data / "data",
                           "--out", tmp_path / "kind", "--steps", 2, "--init-from", init)
    assert code == 2 and "is a ctc drafter, not hydra" in err
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                           tmp_path / "both", "--init-from", init, "--layer-init", "base")
    assert code == 2 and "--layer-init base would replace it" in err
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                           tmp_path / "none", "--init-from", tmp_path / "nowhere")
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("kind", KINDS)
def test_the_shipped_drafters_warm_start_with_default_options(kind):
    """What the GPU round passes (no architecture options) fits every shipped drafter, the Hydra one with its
    narrower MLP too; loss weights (the shipped CTC drafter's prefix term) are the round's to choose."""
    directory = shipped_drafter_dir(DEFAULT_MODEL, kind)
    saved = read_config(directory)
    base = SimpleNamespace(config=SimpleNamespace(hidden_size=saved["draft"]["hidden_size"], intermediate_size=1536,
                                                  num_attention_heads=saved["draft"]["num_heads"]))
    saved_draft = module_config_of(kind, saved["draft"])
    config = warm_start_config(TrainConfig(kind=kind, init_from=str(directory)), saved_draft)
    wanted = module_config(config, base, saved_draft.draft_vocab_size)
    trained_with = {k: getattr(saved_draft, k) for k in TRAINING_ONLY if hasattr(saved_draft, k)}  # loss weights
    assert replace(wanted, **trained_with) == saved_draft


def test_training_on_two_processes_matches_one(tmp_path, tiny_model_dir, tiny_data):
    """`accelerate launch --num_processes 2` (CPU, gloo): the same global batches and anchors, each process
    half of every batch, gradients averaged; the trained weights and loss stay close to one process's."""
    options = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_data / "data"), "--steps", "6",
               "--seed", "3", "--init-from", str(tiny_data / "ctc"), *map(str, TINY_CTC)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ctcspec", *options, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ctcspec"]
    two = subprocess.run([*launch, *options, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    summary_one, summary_two = json.loads(one.stdout), json.loads(two.stdout)
    assert summary_two["processes"] == 2 and summary_one["processes"] == 1
    assert summary_two["final_loss"] == pytest.approx(summary_one["final_loss"], rel=0.03)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    init = load_file(tiny_data / "ctc" / "model.safetensors")
    for name in a:
        if name == "vocab_ids":
            assert (a[name] == b[name]).all()
            continue
        moved = float((a[name].float() - init[name].float()).abs().max())
        # within a tenth of how far training moved the weights, or a bf16 rounding step of the saved value
        torch.testing.assert_close(b[name].float(), a[name].float(), atol=0.1 * moved, rtol=2**-7, msg=name)


def test_gpu_round_dry_run_on_cpu(tmp_path, tiny_model_dir, tiny_data):
    """scripts/gpu_round.sh end to end with a tiny model on the CPU: what a GPU loan would run, so a round is
    never lost to a crash or a missing file."""
    if shutil.which("xz") is None:
        pytest.skip("xz is needed to pack the round's data")
    out, store = tmp_path / "out", tmp_path / "store"
    assert main(["store", str(tiny_data / "data"), "--into", str(store), "--check-float32", "0"]) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MODEL": str(tiny_model_dir), "DEVICE": "cpu", "DTYPE": "bfloat16", "INIT": str(tiny_data / "ctc"),
           "BASELINES": f"medusa:{tiny_data / 'medusa'}", "ROUND_SIZE": "48", "SELF_INSTRUCT": "4", "MAX_NEW": "12",
           "BATCH": "16", "CHECK_FP32": "4", "STEPS": "4", "TRAIN_OPTS": " ".join(map(str, TINY_CTC)),
           "ROUND_S": "1500", "STORE": str(store), "DISTILL_S": "300", "TRAIN_S": "300", "EVAL_S": "300",
           "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_round.sh"), str(out), "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["ctc/config.json", "ctc/model.safetensors", "distilled.tar.xz", "logs.txt",
                                       "medusa.tar", "round.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for f in files for part in f.parts)
    record = json.loads((out / "round.json").read_text())
    assert list(record["phases"]) == ["check", "distill", "store", "train", "eval", "pack"]
    assert all(phase["exit"] == 0 for phase in record["phases"].values())
    assert record["distill"]["answered"] == 52 and record["distill"]["float32_check"]["answers"] == 4
    assert record["train"]["steps"] == 4 and record["train"]["warm_start"]["rounds"] == 2
    trained = record["train"]["train_samples"] + record["train"]["heldout_samples"]
    assert trained == len(read_data([tmp_path / "work" / "store"])) > len(read_data([store])) == 40  # store + round
    assert record["baselines"]["medusa"]["steps"] == 4
    assert record["train"]["config"]["lr"] == record["baselines"]["medusa"]["config"]["lr"] == 3e-4  # warm-start rate
    assert set(record["heldout"]["current"]) == set(record["heldout"]["new"]) and isinstance(record["better"], bool)
    with tarfile.open(out / "distilled.tar.xz") as packed:
        assert {"./samples.jsonl", "./meta.json", "./runs.jsonl", "./self_instruct.jsonl"} <= set(packed.getnames())
        packed.extractall(tmp_path / "back", filter="data")
    assert main(["store", str(tmp_path / "back"), "--into", str(store), "--check-float32", "0"]) == 0  # kept here
    assert len(read_data([store])) == trained
    assert read_manifest(store)["shards"][1]["runs"][0]["float32_check"]["answers"] == 4
    with tarfile.open(out / "medusa.tar") as packed:
        assert {"medusa/config.json", "medusa/model.safetensors"} <= set(packed.getnames())


def test_training_commands_run_without_the_serving_stack():
    """A GPU training machine has torch, transformers and accelerate but not FastAPI or uvicorn: the CLI must
    still load, and only `serve` needs them."""
    blocked = "import sys\nfor name in ('fastapi', 'uvicorn', 'starlette', 'pydantic'):\n    sys.modules[name] = None\n"
    code = blocked + "from ctcspec.cli import main\nsys.exit(main(['train', '--help']))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--init-from" in done.stdout, done.stderr[-2000:]


def test_draft_layer_copied_from_the_base_computes_the_base_layer():
    """--layer-init base: run over a sequence as its own causal context, the copied draft layer gives what the base
    model's last decoder layer gives (GQA heads repeated, the base's rotary base and norm epsilon)."""
    model = tiny_model("llama")
    c = model.config
    layer = DraftLayer(CTCConfig(hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                                 intermediate_size=c.intermediate_size, draft_vocab_size=8,
                                 rope_theta=base_rope_theta(model), rms_eps=c.rms_norm_eps))
    copy_base_layer(layer, model)
    x = torch.randn(1, 7, c.hidden_size)
    positions = torch.arange(7)[None]
    keys, values = layer.keys_values(x, positions)
    ours = layer(x, positions, keys, values, torch.ones(7, 7, dtype=torch.bool).tril()[None, None])
    base = model.get_decoder()
    theirs = base.layers[-1](x, attention_mask=None, position_ids=positions,
                             position_embeddings=base.rotary_emb(x, positions))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="llama or mistral"):
        copy_base_layer(layer, tiny_model("qwen2"))


def test_layer_init_base_trains_and_is_refused_where_it_cannot_apply(capsys, tmp_path, tiny_model_dir, tiny_data):
    code, out, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                             tmp_path / "based", "--steps", 2, "--lr", 0, "--layer-init", "base", *TINY_CTC)
    assert code == 0, err
    saved = load_file(tmp_path / "based" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_decoder().layers[-1]
    for ours, theirs in (("layer.q_proj.weight", base.self_attn.q_proj), ("layer.down_proj.weight", base.mlp.down_proj),
                         ("layer.mlp_norm.weight", base.post_attention_layernorm)):
        assert (saved[ours] == theirs.weight.detach().to(saved[ours].dtype)).all(), ours  # lr 0: still the copy
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--kind", "medusa", "--data", tiny_data / "data",
                           "--out", tmp_path / "m", "--layer-init", "base")
    assert code == 2 and "--kind ctc" in err
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data / "data", "--out",
                           tmp_path / "x", "--layer-init", "copy")
    assert code == 2 and "--layer-init must be one of" in err
