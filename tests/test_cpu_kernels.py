"""CPU kernel layers (oneDNN-packed, native, and their mixes): same products, same parameters, and decoding still
identical to stock HF generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ctc_helpers import tiny_heads_drafter, tiny_module
from test_equivalence import drafters_for, prompts
from transformers import AutoModelForCausalLM

from conftest import ARCHS, hf_greedy, save_tiny_model_dir, tiny_model
from ctcspec.bench.run import hf_generate
from ctcspec.cpu_kernels import (
    INSTALLED_KERNELS,
    KERNEL_LAYERS,
    PackedLinear,
    install_draft_kernels,
    install_kernels,
    linear_kernels_of,
    packing_supported,
    plain_linear_layers,
)
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.kernel_choice import apply_kernels, choose_kernels
from ctcspec.models import load_model
from ctcspec.modules.files import describe_base, load_drafter_module, save_drafter
from ctcspec.native_linear import native_problem

pytestmark = pytest.mark.skipif(not packing_supported(torch.nn.Linear(2, 2)), reason="torch built without oneDNN")
NATIVE = pytest.mark.skipif(native_problem() is not None, reason=f"native kernel: {native_problem()}")
KERNELS_HERE = [pytest.param(k, marks=NATIVE) if k.startswith("native") else k for k in INSTALLED_KERNELS]


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_the_same_product(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    packed = PackedLinear.from_linear(linear)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    for rows in (1, 2, 3, 5, 8, 17, 33, 70):
        x = torch.randn(1, rows, 96)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_mixed_linear_runs_one_row_on_the_stock_kernel_and_several_packed():
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536)
    packed, mixed = PackedLinear.from_linear(linear), PackedLinear.from_linear(linear, one_row_stock=True)
    with torch.inference_mode():
        one = torch.randn(1, 1, 576)
        assert torch.equal(mixed(one), linear(one))  # bit for bit: the same stock product
        several = torch.randn(1, 5, 576)
        assert torch.equal(mixed(several), packed(several))
        assert not torch.equal(packed(several), linear(several))  # else the line above could not tell them apart


def test_packed_linear_falls_back_when_gradients_are_needed():
    linear = torch.nn.Linear(8, 4)
    packed = PackedLinear.from_linear(linear)
    packed(torch.randn(3, 8)).sum().backward()
    assert linear.weight.grad is not None


@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_installing_kernels_keeps_parameters_and_can_be_undone_for_a_block(kernels):
    plain = tiny_model("gemma")  # ties its LM head to the input embedding
    model = tiny_model("gemma")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    count = install_kernels(model, kernels)
    assert count == sum(isinstance(m, torch.nn.Linear) for m in plain.modules()) and count > 0
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # shared, nothing copied or lost
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert linear_kernels_of(model) == kernels
    with plain_linear_layers(model):
        assert linear_kernels_of(model) == "plain"
        assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear_kernels_of(model) == kernels
    other = "packed" if kernels != "packed" else "mixed"
    install_kernels(model, other)  # from one kernel to another, parameters still shared
    assert linear_kernels_of(model) == other
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    install_kernels(model, "plain")
    assert not any(isinstance(m, KERNEL_LAYERS) for m in model.modules())


@pytest.mark.parametrize("kernels", KERNELS_HERE)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_kernel_engine_is_identical_to_hf_generate_on_the_plain_model(arch, kernels):
    plain, packed = tiny_model(arch), tiny_model(arch)
    install_kernels(packed, kernels)
    for prompt in prompts(12):
        expected = hf_greedy(plain, prompt, 40)  # the oracle runs the unmodified HF model
        for drafter in drafters_for(prompt, expected, packed):
            got = SpeculativeEngine(packed, drafter).generate(prompt, 40)
            assert got.tokens == expected, f"{arch}/{drafter.name} prompt={prompt[:8]}..."


@pytest.mark.parametrize("kernels", KERNELS_HERE)
@pytest.mark.parametrize("kind", ["ctc", "medusa", "hydra", "eagle"])
def test_kernel_drafters_draft_the_same_trees(kind, kernels):
    model = tiny_model("qwen2")
    if kind == "ctc":
        plain, packed = CTCDrafter(tiny_module(model, seed=3), 10), CTCDrafter(tiny_module(model, seed=3), 10)
    else:
        plain, packed = tiny_heads_drafter(model, kind, seed=3, tree_budget=10), \
            tiny_heads_drafter(model, kind, seed=3, tree_budget=10)
    install_draft_kernels(packed.module, kernels)
    assert linear_kernels_of(packed.module) == kernels
    install_kernels(model, kernels)
    for prompt in prompts(6):
        runs = [SpeculativeEngine(model, d).generate(prompt, 30) for d in (plain, packed)]
        assert runs[0].tokens == runs[1].tokens == hf_greedy(model, prompt, 30)
        assert runs[0].stats.steps == runs[1].stats.steps  # same trees, so the same acceptance


@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_a_drafter_loads_on_its_base_models_kernels(tmp_path, kernels):
    model = tiny_model("llama")
    save_drafter(tmp_path / "d", tiny_module(model), describe_base(model), dtype=torch.float32)
    assert linear_kernels_of(load_drafter_module(tmp_path / "d", model)[0]) == "plain"
    install_kernels(model, kernels)  # the LM head fingerprint is unchanged, so the drafter still matches
    module, _ = load_drafter_module(tmp_path / "d", model)
    assert linear_kernels_of(module) == kernels == linear_kernels_of(module.kernel_head)


def test_hf_generate_in_the_bench_runs_the_stock_layers(monkeypatch):
    model = tiny_model("gemma")
    prompt = prompts(3)[1]
    expected = hf_greedy(model, prompt, 12)
    install_kernels(model, "packed")

    def refuse(self, x):
        raise AssertionError("HF generate ran a kernel layer")

    monkeypatch.setattr(PackedLinear, "forward", refuse)
    assert hf_generate(model, prompt, 12).tokens == expected
    assert linear_kernels_of(model) == "packed"  # restored afterwards


def mapped_files(tensors) -> set[str]:
    """The files whose mappings hold any of `tensors`' data (Linux's /proc/self/maps)."""
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        regions.append((low, high, fields[5] if len(fields) > 5 else ""))
    return {name for t in tensors for low, high, name in regions if low <= t.data_ptr() < high and name.startswith("/")}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_live_in_process_memory_not_in_the_checkpoint_mapping(tmp_path):
    directory = save_tiny_model_dir(tmp_path / "gemma", "gemma")  # ties its LM head to the input embedding
    from_hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert mapped_files(from_hf.parameters()) == {str(directory / "model.safetensors")}  # what load_model undoes
    model = load_model(str(directory)).model
    assert mapped_files(model.parameters()) == set()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = from_hf.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())


def test_kernel_choice_when_loading(tiny_model_dir):
    auto = load_model(str(tiny_model_dir), kernels="auto").model
    assert linear_kernels_of(auto) == choose_kernels(load_model(str(tiny_model_dir)).model).kernels  # the cached choice
    assert linear_kernels_of(load_model(str(tiny_model_dir), kernels="packed").model) == "packed"
    assert linear_kernels_of(load_model(str(tiny_model_dir)).model) == "plain"  # the library default
    assert linear_kernels_of(load_model(str(tiny_model_dir), dtype="bfloat16", kernels="auto").model) == "plain"
    with pytest.raises(CtcspecError, match="--kernels packed: .*fp32"):
        load_model(str(tiny_model_dir), dtype="bfloat16", kernels="packed")
    with pytest.raises(CtcspecError, match="--kernels mixed: .*fp32"):
        load_model(str(tiny_model_dir), dtype="bfloat16", kernels="mixed")
    with pytest.raises(ValueError, match="unknown kernels"):
        apply_kernels(tiny_model("llama"), "fast")
    with pytest.raises(ValueError, match="unknown kernels"):
        install_kernels(tiny_model("llama"), "auto")
