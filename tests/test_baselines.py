"""The baseline drafters (Medusa, Hydra, EAGLE-style): the tree search is exact, drafting step by
step sees what the offline acceptance curve sees, training on distilled data helps, checkpoints
know their kind, and the shared hidden-state cache is safe."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from ctc_helpers import tiny_heads_drafter, tiny_heads_module, tiny_module, write_distilled

from conftest import hf_greedy, tiny_model
from ctcspec.assembly import build_drafter
from ctcspec.backends import make_backend
from ctcspec.drafters import make_drafter
from ctcspec.drafters.base import DraftRequest
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.modules.files import describe_base, load_drafter_module, save_drafter
from ctcspec.search import best_first_nodes, build_tree, module_nodes
from ctcspec.training.data import base_hidden
from ctcspec.training.evaluate import acceptance_curve
from ctcspec.training.train import TrainConfig, train

HEAD_KINDS = ("medusa", "hydra", "eagle")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_best_first_search_returns_the_best_nodes_in_order():
    """Against brute force: every path up to depth 3 over 5 classes (+ "other"), path-dependent scores."""
    classes, other, depth = 5, 5, 3
    gen = torch.Generator().manual_seed(3)
    table = {}

    def log_probs(path):
        if path not in table:
            table[path] = torch.randn(classes + 1, generator=gen).log_softmax(-1)
        return table[path]

    def expand(state, cls):
        path = state if cls is None else state + (cls,)
        return path, log_probs(path)

    nodes = best_first_nodes((), expand, tree_budget=30, max_depth=depth, top_k=classes, other_id=other)
    score = {}
    for d in range(1, depth + 1):
        for path in itertools.product(range(classes), repeat=d):
            score[path] = sum(float(log_probs(path[:i])[path[i]]) for i in range(d))
    best = sorted(score, key=lambda p: -score[p])[:30]
    assert nodes == best
    assert all(len(n) == 1 or n[:-1] in nodes[:i] for i, n in enumerate(nodes))  # parents first
    assert other not in {c for n in nodes for c in n}


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_step_by_step_drafting_matches_the_offline_search(llama, kind):
    """The drafter, fed accepted positions in chunks, proposes exactly the trees the training-time
    acceptance curve scores (for EAGLE this checks the context cache against a full causal pass)."""
    module = tiny_heads_module(llama, kind)
    drafter = tiny_heads_drafter(llama, kind)
    drafter.module = module
    tokens = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    hidden = base_hidden(llama, tokens, torch.tensor([40]))
    anchors = [5, 6, 9, 17, 30]
    offline = module.offline_contexts(hidden, tokens, anchors)
    drafter.reset()
    seen = -1
    for anchor, context in zip(anchors, offline, strict=True):
        request = DraftRequest(tokens[0, :anchor + 2], 6, new_hidden=hidden[0, seen + 1:anchor + 1])
        seen = anchor
        tree = drafter.propose(request)
        budget = drafter.budget.tree_budget
        expected = build_tree(module_nodes(module, context, budget, 6), budget,
                              module.vocab_ids.tolist())
        assert tree == expected and len(tree) == budget


def _config(**overrides):
    options = dict(steps=40, batch_size=8, anchors_per_sequence=12, draft_vocab=48, eval_every=1000,
                   checkpoint_every=20, heldout_every=8, final_eval_samples=4, target_tokens=3,
                   intermediate_size=64, lr=3e-3)
    return TrainConfig(**{**options, **overrides})


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_training_learns_and_the_drafter_stays_lossless(llama, tmp_path, kind):
    data = write_distilled(llama, tmp_path / "data")
    samples = [json.loads(line) for line in (data / "samples.jsonl").read_text().splitlines()]
    heldout = [s for s in samples if s["index"] % 8 == 0][:4]
    untrained = acceptance_curve(tiny_heads_module(llama, kind, vocab=48, depth=3), llama, heldout,
                                        budgets=(8,))
    summary = train(llama, [data], tmp_path / kind, _config(kind=kind), progress=False)
    assert summary["acceptance_curve"]["search"][8] > untrained[8]
    config = json.loads((tmp_path / kind / "config.json").read_text())
    assert config["kind"] == kind and config["parameters"] > 0
    drafter = build_drafter(kind, make_backend(llama), {kind: tmp_path / kind})  # budget: its curve and our costs
    assert drafter.budget.tree_budget in summary["acceptance_curve"]["search"]
    prompt = [5, 9, 12, 40, 41]
    assert SpeculativeEngine(llama, drafter).generate(prompt, 30).tokens == hf_greedy(llama, prompt, 30)


def test_a_checkpoint_of_another_kind_is_refused(llama, tmp_path):
    save_drafter(tmp_path / "ctc", tiny_module(llama), describe_base(llama))
    save_drafter(tmp_path / "medusa", tiny_heads_module(llama, "medusa"), describe_base(llama))
    with pytest.raises(CtcspecError, match="is a ctc drafter, not medusa"):
        make_drafter("medusa", model=llama, drafter_dir=tmp_path / "ctc")
    with pytest.raises(CtcspecError, match="is a medusa drafter, not ctc"):
        make_drafter("ctc", model=llama, drafter_dir=tmp_path / "medusa")
    with pytest.raises(CtcspecError, match="trained for another base model"):
        load_drafter_module(tmp_path / "medusa", tiny_model("qwen2"))
    with pytest.raises(CtcspecError, match="trained hydra drafter"):
        make_drafter("hydra", model=llama)


def test_hidden_state_cache_is_reused_and_bound_to_its_base_model(llama, tmp_path):
    data = write_distilled(llama, tmp_path / "data")
    cache = tmp_path / "cache"
    config = _config(kind="medusa", steps=6, hidden_cache=str(cache))
    train(llama, [data], tmp_path / "a", config, progress=False)
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert len(files) == 35  # every training sequence once (40 samples, 5 held out)
    train(llama, [data], tmp_path / "b", config, progress=False)
    assert sorted(p.name for p in cache.glob("*.npy")) == files
    a, _ = load_drafter_module(tmp_path / "a", llama)
    b, _ = load_drafter_module(tmp_path / "b", llama)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, msg=name)
    other = tiny_model("llama", seed=1)
    with pytest.raises(CtcspecError, match="another base model"):
        train(other, [data], tmp_path / "c", config, progress=False)
