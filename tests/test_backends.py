"""Backends: each is token-identical to HF `generate` on the model it runs, in full and half precision, and
the one that cannot run a model says so."""

from __future__ import annotations

import pytest
import torch
from ctc_helpers import tiny_ctc_drafter
from test_equivalence import RandomTreeDrafter, prompts

from conftest import hf_greedy, tiny_model
from ctcspec.backends import TORCH_BACKENDS, HFBackend, StaticBackend, make_backend
from ctcspec.drafters import LookupDrafter, VanillaDrafter
from ctcspec.drafters.hybrid import CTCLookupDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.tree import TokenTree
from ctcspec.verify import node_parents, prefill


@pytest.mark.parametrize("arch, expected", [("llama", StaticBackend), ("qwen2", StaticBackend), ("gemma", HFBackend)])
def test_auto_picks_static_where_it_applies(arch, expected):
    assert type(make_backend(tiny_model(arch))) is expected


def test_static_refuses_a_model_it_cannot_run_exactly():
    with pytest.raises(CtcspecError, match="static backend cannot run this model: model type 'gemma'"):
        StaticBackend(tiny_model("gemma"))
    with pytest.raises(CtcspecError, match="unknown backend 'fast'"):
        make_backend(tiny_model("llama"), "fast")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_backends_agree_on_logits_hidden_states_and_cache(arch):
    """One tree forward after a prefill: the same logits, last hidden states and cache entries on both backends."""
    model = tiny_model(arch, seed=5)
    prompt = [4, 19, 33, 7, 61, 2, 88]
    tree = TokenTree.from_sequences([[1, 2, 3], [1, 4], [5, 6, 7, 8]])
    results = []
    for backend in (HFBackend(model), StaticBackend(model)):
        cache = backend.new_cache(32)
        prefill(backend, cache, prompt[:-1])
        out = backend.forward(cache, [prompt[-1], *tree.tokens], node_parents(tree), hidden_layers=(1, 0))
        backend.keep(cache, len(prompt) - 1, [0, 5, 6])
        results.append((out, backend.entries(cache)))
    (hf_out, hf_cache), (static_out, static_cache) = results
    torch.testing.assert_close(static_out.logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    assert static_out.hidden.shape == (1 + len(tree), 3 * model.config.hidden_size)  # last, after 1 layer, embeddings
    torch.testing.assert_close(static_out.hidden, hf_out.hidden, atol=1e-5, rtol=1e-5)
    for (k, v), (hk, hv) in zip(static_cache, hf_cache, strict=True):
        assert k.shape == hk.shape == (1, model.config.num_key_value_heads, len(prompt) - 1 + 3, 16)
        torch.testing.assert_close(k, hk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, hv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", sorted(TORCH_BACKENDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_backend_is_identical_to_hf_generate(arch, backend_name):
    model = tiny_model(arch)
    backend = TORCH_BACKENDS[backend_name](model)
    for prompt in prompts(8):
        expected = hf_greedy(model, prompt, 40)
        for drafter in (VanillaDrafter(), LookupDrafter(min_ngram=1, tree_budget=24), RandomTreeDrafter(len(prompt)),
                        CTCLookupDrafter(tiny_ctc_drafter(model, seed=1, tree_budget=6), LookupDrafter(min_ngram=1))):
            got = SpeculativeEngine(model, drafter, backend=backend).generate(prompt, 40)
            assert got.tokens == expected, f"{arch}/{backend_name}/{drafter.name} prompt={prompt[:8]}..."


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend_name", sorted(TORCH_BACKENDS))
def test_half_precision_on_the_cpu_decodes_plainly_and_refuses_drafters(backend_name, dtype):
    """Lossless at a lower precision means the same tokens as HF `generate` on the model in that precision. On the
    CPU a tree's rows round differently from one-token steps there, so only plain decoding runs."""
    model = tiny_model("llama", seed=2).to(dtype)
    backend = TORCH_BACKENDS[backend_name](model)
    for prompt in prompts(6):
        got = SpeculativeEngine(model, VanillaDrafter(), backend=backend).generate(prompt, 32)
        assert got.tokens == hf_greedy(model, prompt, 32), f"{dtype}/{backend_name} prompt={prompt[:8]}..."
    for drafter in (LookupDrafter(min_ngram=1, tree_budget=16), RandomTreeDrafter(3)):
        with pytest.raises(CtcspecError, match=f"{drafter.name} drafter .* {str(dtype)[6:]} on the CPU"):
            SpeculativeEngine(model, drafter, backend=backend)


def test_static_cache_grows_keeping_what_it_holds():
    model = tiny_model("llama")
    static, hf = StaticBackend(model), HFBackend(model)
    small, reference = static.new_cache(4), hf.new_cache(0)
    for backend, cache in ((static, small), (hf, reference)):
        prefill(backend, cache, [1, 2, 3])
        backend.forward(cache, [4, 5, 6], [-1, 0, 0])
        backend.keep(cache, 3, [0, 2])
    assert small.capacity >= 6 and static.length(small) == 5
    for (k, v), (hk, hv) in zip(static.entries(small), hf.entries(reference), strict=True):
        torch.testing.assert_close(k, hk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, hv, atol=1e-5, rtol=1e-5)


def test_eager_attention_runs_on_the_hf_backend():
    """Static attention is sdpa; an eager model rounds differently (softmax in fp32), so auto leaves it to hf."""
    model = tiny_model("llama", attn="eager")
    assert type(make_backend(model)) is HFBackend
    with pytest.raises(CtcspecError, match="'eager' is not sdpa"):
        StaticBackend(model)
    eager = tiny_model("llama", seed=2, attn="eager")
    prompt = prompts(8)[1]
    got = SpeculativeEngine(eager, LookupDrafter(min_ngram=1)).generate(prompt, 32)
    assert got.tokens == hf_greedy(eager, prompt, 32)
