"""CTC drafters reading several base layers (--feature-layers, EAGLE-3's fused features): the backends return the
layers HF's hidden_states hold, inference equals training, decoding stays identical to HF greedy on two
architectures and both torch backends, a warm start may add the layers without changing what the drafter drafts,
the hidden-state cache keeps each layer, and what cannot run is refused in one line."""

from __future__ import annotations

import pytest
import torch
from ctc_helpers import tiny_module, write_distilled

from conftest import ARCHS, hf_greedy, run_cli, tiny_model
from ctcspec.backends import HFBackend, StaticBackend
from ctcspec.drafters.base import DraftRequest
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.modules import build_module
from ctcspec.modules.files import load_drafter_module
from ctcspec.training import data
from ctcspec.training.data import (
    base_hidden,
    batch_hidden,
    batch_order,
    fill_hidden_cache,
    open_hidden_cache,
    pad_batch,
    read_data,
    split_heldout,
)
from ctcspec.training.train import TrainConfig, planned_samples, train

LAYERS = (1, 0)  # the tiny models have two layers: the output of the first, then the embeddings


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _features(model, tokens: torch.Tensor, layers=LAYERS) -> torch.Tensor:
    states = model(input_ids=tokens, output_hidden_states=True).hidden_states
    return torch.cat([states[-1], *(states[i] for i in layers)], dim=-1)


def test_incremental_inference_equals_training_forward(llama):
    module = tiny_module(llama, feature_layers=LAYERS)
    tokens = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = _features(llama, tokens)
        trained = module.training_logits(hidden, tokens, torch.tensor([[9, 25]])).log_softmax(-1)[0]
        cache, done = None, 0
        for k, cut in enumerate((10, 26)):
            units = module.context_units(hidden[:, done:cut], tokens[:, done + 1:cut + 1])
            cache, done = module.extend(cache, units, done), cut
            torch.testing.assert_close(module.draft_log_probs(cache, units[:, -1]), trained[k], rtol=1e-4, atol=1e-4)
        # the earlier layers matter: other states there give other slots
        moved = hidden.clone()
        moved[..., llama.config.hidden_size:] += 1.0
        assert not torch.allclose(module.training_logits(moved, tokens, torch.tensor([[9, 25]])).log_softmax(-1)[0],
                                  trained)


def test_new_feature_layers_start_as_the_drafter_without_them(llama):
    plain = tiny_module(llama, seed=3)
    torch.manual_seed(0)
    grown = build_module("ctc", plain.config.__class__(**{**plain.config.to_dict(), "feature_layers": LAYERS}),
                         plain.vocab_ids, llama)
    missing, _ = grown.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(name.startswith(("feature_norms.", "feature_fuse.")) for name in missing)
    tokens = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = _features(llama, tokens)
        torch.testing.assert_close(grown.training_logits(hidden, tokens, torch.tensor([[12]])),
                                   plain.training_logits(hidden[..., :llama.config.hidden_size], tokens,
                                                         torch.tensor([[12]])))


@pytest.mark.parametrize("backend", [StaticBackend, HFBackend])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoding_with_feature_layers_identical_to_hf_generate(arch, backend):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(5)
    for i in range(4):
        prompt = torch.randint(2, 96, (4 + 9 * i,), generator=gen).tolist()
        drafter = CTCDrafter(tiny_module(model, seed=i, feature_layers=LAYERS[: 1 + i % 2]), budget=3 + 4 * i)
        got = SpeculativeEngine(model, drafter, backend=backend(model)).generate(prompt, 32)
        assert got.tokens == hf_greedy(model, prompt, 32), f"{arch} prompt {i}"


@pytest.mark.parametrize("backend", [StaticBackend, HFBackend])
def test_the_drafter_gets_the_layers_hf_computes_at_the_accepted_positions(llama, backend):
    """What reaches the drafter, request by request, is HF's hidden_states[-1], [1] and [0] of the positions accepted
    since the last request, concatenated: the right layers, positions and order."""
    seen = []

    class Spy(CTCDrafter):
        def propose(self, request):
            seen.append((len(request.tokens), request.new_hidden.clone()))
            return super().propose(request)

    prompt = [5, 17, 33, 8, 61, 2]
    out = SpeculativeEngine(llama, Spy(tiny_module(llama, feature_layers=LAYERS), budget=6),
                            backend=backend(llama)).generate(prompt, 24)
    sequence = torch.tensor([prompt + out.tokens])
    with torch.no_grad():
        expected = _features(llama, sequence)[0]
    done = 0
    for length, hidden in seen:  # the states of positions done .. length - 2 (the root's comes with the next step)
        assert hidden.shape == (length - 1 - done, 3 * llama.config.hidden_size)
        torch.testing.assert_close(hidden, expected[done:length - 1], atol=1e-4, rtol=1e-4)
        done = length - 1
    assert len(seen) > 2


def test_feature_layers_the_model_lacks_are_refused(llama):
    with pytest.raises(CtcspecError, match=r"reads base layers \[2\]; this model has layers 0 .. 1"):
        SpeculativeEngine(llama, CTCDrafter(tiny_module(llama, feature_layers=(2,))))
    drafter = CTCDrafter(tiny_module(llama, feature_layers=LAYERS))
    with pytest.raises(CtcspecError, match="reads 192 hidden features per position"):
        drafter.propose(DraftRequest(torch.tensor([3, 4, 5]), 4, new_hidden=torch.zeros(2, 64)))


def test_a_backend_without_earlier_layers_is_refused(llama):
    class LastLayerOnly(HFBackend):
        earlier_layers = False

    drafter = CTCDrafter(tiny_module(llama, feature_layers=LAYERS))
    with pytest.raises(CtcspecError, match=r"reads base layers \[1, 0\].*--backend static or hf"):
        SpeculativeEngine(llama, drafter, backend=LastLayerOnly(llama))


def test_hidden_cache_keeps_every_layer(llama, tmp_path):
    samples = read_data([write_distilled(llama, tmp_path / "data", count=6)])
    tokens, lengths, _ = pad_batch(samples[:3], 1024, "cpu")
    raw = base_hidden(llama, tokens, lengths, LAYERS)
    direct = raw.clone()
    cache = open_hidden_cache(tmp_path / "cache", llama)
    cached = [batch_hidden(llama, samples[:3], tokens, lengths, cache, LAYERS) for _ in range(2)]
    last_only = batch_hidden(llama, samples[:3], tokens, lengths, cache)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3 * 3
    d = llama.config.hidden_size
    earlier = direct[..., d:].unflatten(-1, (-1, d))
    direct[..., d:] = (earlier * torch.rsqrt(earlier.pow(2).mean(-1, keepdim=True))).flatten(-2)  # kept normalised
    module = tiny_module(llama, feature_layers=LAYERS)
    for got in cached:
        for row, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(got[row, :n], direct[row, :n], atol=2e-3, rtol=2e-3)  # fp16 on disk
        with torch.no_grad():  # what the module makes of them is what it makes of the raw states
            units, raw_units = module.context_units(got, tokens), module.context_units(raw, tokens)
        for row, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(units[row, :n], raw_units[row, :n], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(last_only, cached[0][..., :llama.config.hidden_size])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_base_hidden_is_what_the_causal_lm_returns(arch):
    model = tiny_model(arch)
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([12, 7])
    mask = (torch.arange(12) < lengths[:, None]).long()
    with torch.no_grad():
        states = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    got = base_hidden(model, tokens, lengths, LAYERS)
    want = torch.cat([states[-1], *(states[i] for i in LAYERS)], dim=-1)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[row, :n], want[row, :n])


def test_filling_the_hidden_cache_shortest_first(llama, tmp_path, monkeypatch):
    samples = read_data([write_distilled(llama, tmp_path / "data", count=7)])
    samples = [{**s, "ids": s["ids"][:12 + 3 * i]} for i, s in enumerate(samples)]  # lengths 12 .. 30
    cache = open_hidden_cache(tmp_path / "cache", llama)
    tokens, lengths, _ = pad_batch(samples, 1024, "cpu")
    expected = batch_hidden(llama, samples, tokens, lengths, None, LAYERS)
    batch_hidden(llama, samples[2:3], *pad_batch(samples[2:3], 1024, "cpu")[:2], cache, LAYERS)
    shapes = []
    monkeypatch.setattr(data, "base_hidden", lambda model, ids, *rest: shapes.append(tuple(ids.shape))
                        or base_hidden(model, ids, *rest))
    assert fill_hidden_cache(llama, samples[::-1], cache, 1024, LAYERS, batch_tokens=40) == 6  # one was there
    assert shapes == [(2, 15), (1, 21), (1, 24), (1, 27), (1, 30)]  # shortest first, at most 40 padded tokens
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 7 * 3
    assert fill_hidden_cache(llama, samples, cache, 1024, LAYERS) == 0
    assert fill_hidden_cache(llama, samples, cache, 1024, (0,)) == 0  # layer 0 was filled beside the last
    assert len(shapes) == 5
    got = batch_hidden(llama, samples, tokens, lengths, cache, LAYERS)
    d = llama.config.hidden_size
    for row, n in enumerate(lengths.tolist()):  # the last layer as computed; earlier layers kept normalised (fp16)
        torch.testing.assert_close(got[row, :n, :d], expected[row, :n, :d], atol=2e-3, rtol=2e-3)
    assert fill_hidden_cache(llama, samples[:2], cache, 10, LAYERS, deadline=0.0) == 0  # past its deadline
    assert fill_hidden_cache(llama, samples[:2], cache, 10, LAYERS) == 2  # cut at max_length: other sequences


def test_training_fills_the_cache_for_the_steps_it_runs(llama, tmp_path):
    data = write_distilled(llama, tmp_path / "data")
    config = _config(steps=2, hidden_cache=str(tmp_path / "cache"))
    train(llama, [data], tmp_path / "d", config, progress=False)
    train_set, _ = split_heldout(read_data([data]), config.heldout_every)
    planned = {i for batch in batch_order(train_set, config.batch_size, config.seed, 0)[:2] for i in batch}
    assert len(planned) < len(train_set)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(planned)  # two batches' worth, not the epoch's
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    shares = [planned_samples(train_set, config, steps_per_epoch, 0, 2, rank, 2) for rank in (0, 1)]
    assert sorted(s["index"] for share in shares for s in share) == sorted(train_set[i]["index"] for i in planned)
    assert planned_samples(train_set, config, steps_per_epoch, 2, 2, 0, 1) == []  # a finished run needs nothing


def _config(**overrides):
    options = dict(steps=6, batch_size=8, anchors_per_sequence=8, draft_vocab=48, eval_every=6, checkpoint_every=6,
                   heldout_every=8, final_eval_samples=2, num_slots=4, target_tokens=3)
    return TrainConfig(**{**options, **overrides})


def test_training_and_warm_starts_with_feature_layers(llama, tmp_path):
    data = write_distilled(llama, tmp_path / "data")
    train(llama, [data], tmp_path / "plain", _config(), progress=False)
    summary = train(llama, [data], tmp_path / "grown", _config(init_from=str(tmp_path / "plain"),
                                                               feature_layers="1,0"), progress=False)
    assert summary["config"]["feature_layers"] == "1,0" and summary["warm_start"]["rounds"] == 2
    module, config = load_drafter_module(tmp_path / "grown", llama)
    assert module.feature_layers == LAYERS and config["draft"]["feature_layers"] == [1, 0]
    again = train(llama, [data], tmp_path / "again", _config(init_from=str(tmp_path / "grown")), progress=False)
    assert again["config"]["feature_layers"] == "1,0"  # a warm start keeps them
    with pytest.raises(CtcspecError, match="feature_layers"):
        train(llama, [data], tmp_path / "other", _config(init_from=str(tmp_path / "grown"), feature_layers="0"),
              progress=False)


def test_feature_layer_user_errors(capsys, tmp_path, tiny_model_dir):
    data = write_distilled(tiny_model("llama"), tmp_path / "data", count=8)
    common = ("train", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "d", "--steps", 1)
    for value, expected in (("a,b", "comma-separated layer numbers"), ("1,1", "distinct"),
                            ("2", "0 (embeddings) .. 1")):
        code, _, err = run_cli(capsys, *common, "--feature-layers", value)
        assert code == 2 and expected in err and "Traceback" not in err, (value, err)
    code, _, err = run_cli(capsys, *common, "--kind", "medusa", "--feature-layers", "1")
    assert code == 2 and "for --kind ctc" in err
