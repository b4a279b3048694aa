"""The loss terms beside plain CTC, against brute force: the prefix probabilities and the best alignment
enumerate every path of a few slots; the soft-target term is recomputed draft by draft from the base model's
LM head. Training with them (and with two draft layers) learns, saves, warm-starts and stays lossless."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ctc_helpers import tiny_module, write_distilled

from conftest import hf_greedy, run_cli, tiny_model
from ctcspec.drafters import make_drafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.modules.alignment import IMPOSSIBLE, best_alignment, prefix_log_probs
from ctcspec.modules.files import load_drafter_module
from ctcspec.training.data import draft_targets
from ctcspec.training.evaluate import acceptance_curve
from ctcspec.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _collapse(path, blank):
    out, previous = [], None
    for c in path:
        if c != previous and c != blank:
            out.append(c)
        previous = c
    return out


@pytest.mark.parametrize("slots", [3, 5])
def test_prefix_probabilities_and_best_alignment_match_enumeration(slots):
    classes, blank = 4, 3
    gen = torch.Generator().manual_seed(slots)
    for _ in range(12):
        log_probs = torch.randn(slots, 4, classes, generator=gen).mul(2).log_softmax(-1)
        targets = torch.randint(0, 3, (4, 3), generator=gen)
        targets[0] = torch.tensor([1, 1, 1])           # repeats need blanks between them: may not fit
        lengths = torch.randint(1, 4, (4,), generator=gen)
        lengths[0] = 3
        prefix = prefix_log_probs(log_probs, targets, blank)
        alignment = best_alignment(log_probs, targets, lengths, blank)
        for d in range(4):
            y = targets[d, :lengths[d]].tolist()
            starts = [0.0] * len(y)
            best_score, best_path = -math.inf, None
            for path in itertools.product(range(classes), repeat=slots):
                score = sum(log_probs[s, d, c].item() for s, c in enumerate(path))
                out = _collapse(path, blank)
                for k in range(len(y)):
                    starts[k] += math.exp(score) * (out[:k + 1] == y[:k + 1])
                if out == y and score > best_score:
                    best_score, best_path = score, path
            for k, probability in enumerate(starts):
                if probability == 0:
                    assert prefix[d, k] < IMPOSSIBLE
                else:
                    assert prefix[d, k].exp().item() == pytest.approx(probability, rel=1e-4, abs=1e-7)
            if best_path is None:
                assert alignment[d].tolist() == [-1] * slots
            else:
                got = alignment[d].tolist()
                score = sum(log_probs[s, d, blank if k < 0 else y[k]].item() for s, k in enumerate(got))
                assert score == pytest.approx(best_score, abs=1e-5)        # ties may pick another best path
                assert _collapse([blank if k < 0 else y[k] for k in got], blank) == y


def test_prefix_loss_has_finite_gradients_where_a_prefix_cannot_fit():
    log_probs = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0)).log_softmax(-1).requires_grad_()
    targets = torch.tensor([[1, 1, 1], [1, 2, 3]])                   # draft 0: three repeats need 5 slots
    prefix = prefix_log_probs(log_probs, targets, 4)
    assert prefix[0, 2] < IMPOSSIBLE and prefix[1, 2] > IMPOSSIBLE
    prefix[prefix > IMPOSSIBLE].sum().backward()
    assert torch.isfinite(log_probs.grad).all()


def _batch(module, llama):
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(3, 96, (2, 24), generator=gen)
    lengths = torch.tensor([24, 20])
    anchors = torch.tensor([[4, 11, 19], [2, 9, 16]])
    valid = torch.ones_like(anchors, dtype=torch.bool)
    with torch.no_grad():
        out = llama(input_ids=tokens, output_hidden_states=True)
    targets, target_lengths = draft_targets(module, tokens, lengths, anchors, valid, module.config.target_tokens)
    return out, tokens, anchors, targets, target_lengths


@torch.no_grad()
def _loss_and_drafts(module, out, tokens, anchors, targets, target_lengths):
    """The module's training loss on a batch, and per draft with a target, as a loop: (batch row, anchor,
    targets, slot log-probs (N, classes))."""
    hidden = out.hidden_states[-1]
    loss = module(hidden, tokens, anchors, targets, target_lengths)
    log_probs = module.training_logits(hidden, tokens, anchors).float().log_softmax(-1)
    drafts = [(b, int(anchors[b, a]), targets[b, a, :int(target_lengths[b, a])], log_probs[b, a])
              for b in range(anchors.shape[0]) for a in range(anchors.shape[1]) if target_lengths[b, a] > 0]
    return loss, drafts


def _plain_ctc(module, drafts):
    c = module.config
    return torch.stack([F.ctc_loss(lp[:, None], y[None], [c.num_slots], [len(y)], blank=c.blank_id,
                                   zero_infinity=True) for _, _, y, lp in drafts]).mean()  # mean: per token


def test_soft_term_is_the_kl_from_the_base_models_logits_at_each_aligned_slot(llama):
    module = tiny_module(llama, vocab=96, num_slots=5, target_tokens=3, soft_weight=1.0)
    out, *batch = _batch(module, llama)
    got, drafts = _loss_and_drafts(module, out, *batch)
    c = module.config
    with torch.no_grad():
        terms = []
        for b, t, y, lp in drafts:
            alignment = best_alignment(lp[:, None], y[None], torch.tensor([len(y)]), c.blank_id)[0]
            for slot, k in enumerate(alignment.tolist()):
                if k >= 0 and y[k] != c.other_id:
                    base = out.logits[b, t + 1 + k, module.vocab_ids].log_softmax(-1)  # predicted x_{t+2+k}
                    terms.append((base.exp() * (base - lp[slot, :c.draft_vocab_size])).sum())
        assert len(terms) >= 6
        torch.testing.assert_close(got, _plain_ctc(module, drafts) + torch.stack(terms).mean(), rtol=1e-4, atol=1e-4)


def test_prefix_term_averages_the_prefix_log_probabilities_that_fit(llama):
    module = tiny_module(llama, vocab=96, num_slots=4, target_tokens=3, prefix_weight=0.5)
    out, tokens, anchors, targets, target_lengths = _batch(module, llama)
    targets[0, 0] = targets[0, 0, 0]            # three repeats need 5 slots: its longest prefix is left out
    got, drafts = _loss_and_drafts(module, out, tokens, anchors, targets, target_lengths)
    c = module.config
    with torch.no_grad():
        terms = []
        for _, _, y, lp in drafts:
            prefix = prefix_log_probs(lp[:, None], y[None], c.blank_id)[0]
            terms += [-p for p in prefix.tolist() if p > IMPOSSIBLE]
        assert len(terms) == sum(len(y) for _, _, y, _ in drafts) - 1
        expected = _plain_ctc(module, drafts) + 0.5 * sum(terms) / len(terms)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _config(**overrides):
    options = dict(steps=60, lr=3e-3, batch_size=8, anchors_per_sequence=12, draft_vocab=48, eval_every=30,
                   checkpoint_every=30, heldout_every=8, final_eval_samples=4, num_slots=4, target_tokens=3)
    return TrainConfig(**{**options, **overrides})


@pytest.mark.parametrize("options", [dict(prefix_weight=1.0, soft_weight=0.5), dict(num_layers=2)])
def test_new_recipes_learn_save_and_stay_lossless(llama, tmp_path, options):
    data = write_distilled(llama, tmp_path / "data")
    heldout = [json.loads(line) for line in (data / "samples.jsonl").read_text().splitlines()][:4]
    untrained = acceptance_curve(tiny_module(llama, vocab=48, num_slots=4, target_tokens=3,
                                             num_layers=options.get("num_layers", 1)), llama, heldout, budgets=(8,))
    summary = train(llama, [data], tmp_path / "drafter", _config(**options), progress=False)
    assert summary["acceptance_curve"]["beam"][8] > untrained[8]
    module, _ = load_drafter_module(tmp_path / "drafter", llama)
    for name, value in options.items():
        assert getattr(module.config, name) == value
    drafter = make_drafter("ctc", model=llama, drafter_dir=tmp_path / "drafter")
    prompt = [5, 9, 12, 40, 41]
    assert SpeculativeEngine(llama, drafter).generate(prompt, 30).tokens == hf_greedy(llama, prompt, 30)


def test_warm_start_may_change_loss_weights_but_not_layers(llama, tmp_path):
    data = write_distilled(llama, tmp_path / "data")
    train(llama, [data], tmp_path / "first", _config(steps=6), progress=False)
    summary = train(llama, [data], tmp_path / "second",
                    _config(steps=6, prefix_weight=0.5, init_from=str(tmp_path / "first")), progress=False)
    assert summary["warm_start"]["earlier_steps"] == 6
    with pytest.raises(CtcspecError, match="num_layers 1 .*give 2"):
        train(llama, [data], tmp_path / "third", _config(steps=6, num_layers=2, init_from=str(tmp_path / "first")),
              progress=False)


@pytest.mark.parametrize("argv,message", [
    (["--num-layers", "0"], "--num-layers must be at least 1"),
    (["--prefix-weight", "-1"], "--prefix-weight must not be negative"),
    (["--soft-weight", "nan"], "--soft-weight must be a finite number"),
    (["--soft-weight", "x"], "invalid float value"),
    (["--kind", "medusa", "--soft-weight", "0.5"], "are for --kind ctc"),
    (["--loss", "ce", "--prefix-weight", "0.5"], "go with --loss ctc"),
    (["--layer-init", "base", "--num-layers", "2"], "use it with --num-layers 1"),
])
def test_bad_recipe_options_are_one_line_errors(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *argv)
    assert code == 2 and message in err and "Traceback" not in err
