"""The CTC drafter: inference matches training, checkpoints round-trip and refuse the wrong base
model, training resumes exactly, and decoding with it stays identical to HF greedy generate."""

from __future__ import annotations

import json

import pytest
import torch
from ctc_helpers import tiny_ctc_drafter, tiny_module, write_distilled

from conftest import hf_greedy, tiny_model
from ctcspec.drafters import make_drafter
from ctcspec.drafters.base import DraftRequest
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.modules.files import load_drafter_module, save_drafter
from ctcspec.pricing import BudgetPlan, PricedBudget
from ctcspec.training.data import draft_targets
from ctcspec.training.evaluate import acceptance_curve
from ctcspec.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("slot_attention,num_layers", [("bidirectional", 1), ("causal", 1), ("bidirectional", 2),
                                                        ("causal", 3)])
def test_incremental_inference_equals_training_forward(llama, slot_attention, num_layers):
    """The cached, chunk-by-chunk inference path gives the slot distributions training optimises."""
    module = tiny_module(llama, slot_attention=slot_attention, num_layers=num_layers)
    tokens = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = llama(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        anchors = torch.tensor([[5, 17, 30]])
        trained = module.training_logits(hidden, tokens, anchors).log_softmax(-1)[0]
        cache, done = None, 0
        for cut in (6, 18, 31):  # positions accepted in chunks, as the engine hands them over
            units = module.context_units(hidden[:, done:cut], tokens[:, done + 1:cut + 1])
            cache = module.extend(cache, units, done)
            done = cut
            got = module.draft_log_probs(cache, units[:, -1])
            expected = trained[[6, 18, 31].index(cut)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_causal_slots_do_not_see_later_slots(llama):
    module = tiny_module(llama, slot_attention="causal")
    tokens = torch.randint(3, 96, (1, 12))
    hidden = torch.randn(1, 12, 64)
    with torch.no_grad():
        before = module.training_logits(hidden, tokens, torch.tensor([[8]]))
        module.slot_embed[-1].add_(5.0)
        after = module.training_logits(hidden, tokens, torch.tensor([[8]]))
    torch.testing.assert_close(before[..., :-1, :], after[..., :-1, :])
    assert not torch.allclose(before[..., -1, :], after[..., -1, :])


def test_targets_are_the_tokens_after_the_root_cut_after_other(llama):
    module = tiny_module(llama, vocab=96)  # every token in the draft vocabulary
    tokens = torch.arange(10, 30)[None]
    lengths = torch.tensor([20])
    targets, n = draft_targets(module, tokens, lengths, torch.tensor([[3, 16]]), torch.tensor([[True, True]]), 4)
    assert targets[0, 0].tolist() == [15, 16, 17, 18] and n[0, 0] == 4  # anchor 3: root 14, then 15..
    assert n[0, 1] == 2 and targets[0, 1, :2].tolist() == [28, 29]  # the sequence ends
    small = tiny_module(llama, vocab=8)
    classes, n = draft_targets(small, tokens, lengths, torch.tensor([[3]]), torch.tensor([[True]]), 4)
    other = small.config.other_id
    ids = classes[0, 0, :n[0, 0]].tolist()
    assert ids[-1] == other or n[0, 0] == 4
    assert other not in ids[:-1]


def test_drafter_extends_its_cache_and_proposes_valid_trees(llama):
    drafter = tiny_ctc_drafter(llama, tree_budget=10)
    tokens = torch.randint(3, 96, (20,))
    with torch.no_grad():
        hidden = llama(input_ids=tokens[None], output_hidden_states=True).hidden_states[-1][0]
    tree = drafter.propose(DraftRequest(tokens, max_depth=3, new_hidden=hidden[:19]))
    assert 1 <= len(tree) <= 10 and max(tree.depths()) <= 3
    first_cache = drafter._cache
    drafter.propose(DraftRequest(torch.cat([tokens, torch.tensor([5])]), max_depth=8, new_hidden=hidden[19:20]))
    assert first_cache[0].length == 19 and drafter._cache[0].length == 20  # a new cache; the old one is untouched
    with pytest.raises(CtcspecError, match="hidden states"):
        drafter.propose(DraftRequest(tokens, max_depth=3))


@pytest.mark.parametrize("transform", ["beam", "topk", "none"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_ctc_decoding_identical_to_hf_generate(arch, transform):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(3)
    for i in range(6):
        prompt = torch.randint(2, 96, (3 + 11 * i,), generator=gen).tolist()
        expected = hf_greedy(model, prompt, 40)
        drafter = tiny_ctc_drafter(model, seed=i, tree_budget=4 + 5 * i, transform=transform)
        got = SpeculativeEngine(model, drafter).generate(prompt, 40)
        assert got.tokens == expected, f"{arch}/{transform} prompt {i}"


def test_checkpoint_round_trip_and_base_model_check(llama, tmp_path):
    module = tiny_module(llama)
    save_drafter(tmp_path / "d", module, _base(llama), {"acceptance_curve": {"beam": {"4": 1.5}}}, dtype=torch.float32)
    loaded, config = load_drafter_module(tmp_path / "d", llama)
    for (name, a), (_, b) in zip(module.named_parameters(), loaded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert config["acceptance_curve"]["beam"]["4"] == 1.5
    other = tiny_model("llama", seed=1)
    with pytest.raises(CtcspecError, match="another base model.*lm_head_sha256"):
        load_drafter_module(tmp_path / "d", other)
    with pytest.raises(CtcspecError, match="another base model"):
        load_drafter_module(tmp_path / "d", tiny_model("qwen2"))


def test_broken_drafter_directories_are_clear_errors(llama, tmp_path):
    with pytest.raises(CtcspecError, match="does not exist"):
        load_drafter_module(tmp_path / "missing", llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtcspecError, match="no config.json"):
        load_drafter_module(tmp_path / "empty", llama)
    save_drafter(tmp_path / "d", tiny_module(llama), _base(llama))
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CtcspecError, match="corrupt or truncated"):
        load_drafter_module(tmp_path / "d", llama)
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CtcspecError, match="not valid JSON"):
        load_drafter_module(tmp_path / "d", llama)
    with pytest.raises(CtcspecError, match="trained ctc drafter"):
        make_drafter("ctc", model=llama)  # nothing ships for a tiny model


def _base(model):
    from ctcspec.modules.files import describe_base

    return describe_base(model)


def _config(**overrides):
    options = dict(steps=12, batch_size=8, anchors_per_sequence=12, draft_vocab=48, eval_every=6,
                   checkpoint_every=6, heldout_every=8, final_eval_samples=4, num_slots=4, target_tokens=3)
    return TrainConfig(**{**options, **overrides})


def test_training_learns_and_saves_a_loadable_drafter(llama, tmp_path):
    data = write_distilled(llama, tmp_path / "data")
    untrained = acceptance_curve(tiny_module(llama, vocab=48, num_slots=4, target_tokens=3), llama,
                                 [json.loads(line) for line in (data / "samples.jsonl").read_text().splitlines()][:4],
                                 budgets=(8,))
    summary = train(llama, [data], tmp_path / "drafter", _config(steps=60, lr=3e-3), progress=False)
    assert summary["steps"] == 60 and summary["heldout_samples"] == 5
    assert summary["acceptance_curve"]["beam"][8] > untrained[8]
    history = summary["eval_history"]  # the scaling curve of one run: held-out acceptance by answer tokens seen
    assert [h["step"] for h in history] == list(range(6, 61, 6)) and set(history[0]["accepted"]) == {"1", "4", "16"}
    seen = [h["answer_tokens_seen"] for h in history]
    assert seen == sorted(seen) and seen[-1] == summary["answer_tokens_seen"] > 0
    drafter = make_drafter("ctc", model=llama, drafter_dir=tmp_path / "drafter")
    assert drafter.acceptance_curve == summary["acceptance_curve"]["beam"]
    prompt = [5, 9, 12, 40, 41]
    assert SpeculativeEngine(llama, drafter).generate(prompt, 30).tokens == hf_greedy(llama, prompt, 30)


def test_resumed_training_equals_an_uninterrupted_run(llama, tmp_path, monkeypatch):
    data = write_distilled(llama, tmp_path / "data")
    train(llama, [data], tmp_path / "straight", _config(), progress=False)

    import ctcspec.training.train as train_module

    real_save = train_module._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint (step 6)

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(llama, [data], tmp_path / "resumed", _config(), progress=False)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 6
    with pytest.raises(CtcspecError, match="different training options.*lr"):
        train(llama, [data], tmp_path / "resumed", _config(lr=0.5), resume=True, progress=False)
    train(llama, [data], tmp_path / "resumed", _config(), resume=True, progress=False)
    a, _ = load_drafter_module(tmp_path / "straight", llama)
    b, _ = load_drafter_module(tmp_path / "resumed", llama)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_adaptive_budget_follows_the_observed_acceptance():
    acceptance, cost = {1: 0.6, 4: 1.2, 8: 1.5, 16: 1.7}, {1: 1.0, 2: 1.6, 5: 1.7, 9: 2.0, 17: 2.2}
    plan = BudgetPlan(acceptance, cost, dict.fromkeys(acceptance, 0.1))
    policy = PricedBudget(plan, plan.best())
    assert policy.choose(0.0, 0.0) == plan.best() == 4  # the prior alone
    assert policy.choose(60.0, 20.0) == 16      # drafts accepted 3x as often as expected: a bigger tree pays
    assert policy.choose(1.0, 30.0) == 0        # drafts rejected: plain decoding is faster


def test_adaptive_drafter_stops_drafting_when_nothing_is_accepted(llama):
    prompt = list(range(3, 40))
    expected = hf_greedy(llama, prompt, 60)
    plan = BudgetPlan({4: 1.2, 8: 1.5}, {1: 1.0, 5: 1.6, 9: 1.8}, {4: 0.1, 8: 0.1})
    fixed = SpeculativeEngine(llama, tiny_ctc_drafter(llama, tree_budget=8)).generate(prompt, 60)
    drafter = tiny_ctc_drafter(llama, tree_budget=PricedBudget(plan, 8, probe=8))
    adaptive = SpeculativeEngine(llama, drafter).generate(prompt, 60)
    assert fixed.tokens == adaptive.tokens == expected
    assert adaptive.stats.drafted_nodes < fixed.stats.drafted_nodes / 2  # a random module's drafts never pay
