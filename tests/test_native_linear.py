"""ctcspec's native fp32 kernel: torch's product up to summation order, every row bit for bit its one-row
product, and `--kernels auto` choosing by measurement, cached per machine and model shape."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_model
from ctcspec import kernel_choice, native_linear
from ctcspec.cpu_kernels import INSTALLED_KERNELS, PackedLinear, install_kernels, kernel_layer
from ctcspec.kernel_choice import CHOICE_ROWS, choice_cache_path, choose_kernels
from ctcspec.native_linear import NativeLinear, native_problem

NATIVE = pytest.mark.skipif(native_problem() is not None, reason=f"native kernel: {native_problem()}")
SHAPES = [(576, 1536, True), (96, 200, False), (37, 13, True), (16, 4, False), (1, 5, True), (100, 49, False)]


@NATIVE
@pytest.mark.parametrize("width,out,bias", SHAPES)
def test_native_product_is_torchs_up_to_summation_order(width, out, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, out, bias=bias)
    native = NativeLinear.from_weight(linear.weight, linear.bias)
    assert native.weight is linear.weight and native.bias is linear.bias
    for rows in (1, 2, 3, 4, 5, 8, 13):
        x = torch.randn(2, rows, width)
        with torch.inference_mode():
            got = native(x)
        expected = F.linear(x.double(), linear.weight.double(), None if bias is False else linear.bias.double())
        assert got.shape == (2, rows, out) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@NATIVE
@pytest.mark.parametrize("width,out,bias", SHAPES)
def test_every_row_of_a_native_product_is_its_one_row_product(width, out, bias):
    """The kernel's invariant: a tree verification's rows round exactly as one-token steps would."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(width, out, bias=bias)
    native = NativeLinear.from_weight(linear.weight, linear.bias)
    x = torch.randn(13, width)
    with torch.inference_mode():
        alone = torch.stack([native(x[i:i + 1])[0] for i in range(13)])
        for rows in (2, 3, 4, 5, 7, 8, 13):
            assert torch.equal(native(x[:rows]), alone[:rows]), rows
        assert torch.equal(native(x[5:11]), alone[5:11])  # wherever the row sits


@NATIVE
def test_native_linear_falls_back_to_the_stock_layer_for_gradients():
    linear = torch.nn.Linear(8, 4)
    native = NativeLinear.from_weight(linear.weight, linear.bias)
    native(torch.randn(3, 8)).sum().backward()
    assert linear.weight.grad is not None


@NATIVE
def test_native_packed_runs_native_up_to_four_rows_and_packed_beyond():
    torch.manual_seed(3)
    linear = torch.nn.Linear(576, 96)
    both = kernel_layer(linear.weight, linear.bias, "native-packed")
    native, packed = NativeLinear.from_weight(linear.weight, linear.bias), PackedLinear.from_linear(linear)
    with torch.inference_mode():
        few, many = torch.randn(1, 4, 576), torch.randn(1, 5, 576)
        assert torch.equal(both(few), native(few)) and torch.equal(both(many), packed(many))
        assert not torch.equal(native(many), packed(many))  # else the line above could not tell them apart


def test_a_failed_build_is_reported_and_auto_measures_the_others(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CTCSPEC_HOME", str(tmp_path / "home"))
    native_linear._library.cache_clear()
    native_problem.cache_clear()
    try:
        problem = native_problem()
        assert problem
        if native_linear.cpu_description()["flags"].count("avx512f") and "x86-64" not in problem:
            assert "no-such-compiler" in problem  # on a CPU the kernel runs on, the build is what failed
        model = tiny_model("llama")
        with pytest.raises(ValueError, match="native kernel cannot run here"):
            install_kernels(model, "native")
        choice = choose_kernels(model)
        assert set(choice.unavailable) == {"native"} and not {"native", "native-packed"} & set(choice.milliseconds)
        assert choice.kernels in ("mixed", "packed", "plain")
    finally:
        native_linear._library.cache_clear()
        native_problem.cache_clear()


def test_auto_takes_the_fastest_measured_kernels_and_caches_the_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("CTCSPEC_HOME", str(tmp_path))
    fake = {"native": [9.0, 10.0, 30.0, 50.0], "packed": [12.0, 11.0, 12.0, 14.0], "plain": [15.0, 20.0, 30.0, 40.0]}
    calls = []

    def timings(model, kernels, rounds=7, seed=0):
        calls.append(list(kernels))
        return {name: dict(zip(CHOICE_ROWS, fake[name], strict=True)) for name in kernels}

    monkeypatch.setattr(kernel_choice, "time_kernels", timings)
    monkeypatch.setattr(kernel_choice, "kernels_problem", lambda model, kernels: None)
    model = tiny_model("qwen2")
    choice = choose_kernels(model)
    # native-packed = native up to 4 rows, packed beyond: 9 + 10 + 12 + 14 beats packed's 49 and mixed's 52
    assert choice.kernels == "native-packed"
    assert choice.milliseconds["mixed"] == dict(zip(CHOICE_ROWS, [15.0, 11.0, 12.0, 14.0], strict=True))
    assert "native-packed" in choice.describe() and choice.cpu in choice.describe()
    assert choose_kernels(model) == choice and len(calls) == 1  # read from the cache, not measured again
    saved = json.loads(choice_cache_path(model).read_text())
    assert saved["kernels"] == "native-packed"
    path, threads = choice_cache_path(model), torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another thread count is another measurement
        assert choice_cache_path(model) != path
    finally:
        torch.set_num_threads(threads)
    assert choose_kernels(model, remeasure=True) == choice and len(calls) == 2


def test_auto_leaves_models_no_kernel_applies_to_plain(monkeypatch, tmp_path):
    monkeypatch.setenv("CTCSPEC_HOME", str(tmp_path))
    choice = choose_kernels(tiny_model("llama").to(torch.bfloat16))
    assert choice.kernels == "plain" and not choice.milliseconds and "fp32" in choice.describe()
    assert not list(tmp_path.iterdir())  # nothing measured, nothing cached


def test_kernels_command_prints_the_choice(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "kernels", "--model", tiny_model_dir, "--threads", "1")
    assert code == 0, err
    assert out.startswith("kernels ") and "1 thread(s)" in out
    chosen = out.split()[1].rstrip(",")
    assert chosen in (*INSTALLED_KERNELS, "plain")
    code, out, _ = run_cli(capsys, "kernels", "--model", tiny_model_dir, "--threads", "1", "--json")
    assert code == 0 and json.loads(out)["kernels"] == chosen  # the cached choice
    code, _, err = run_cli(capsys, "kernels", "--model", tiny_model_dir / "missing")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
