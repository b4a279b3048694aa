"""The CTC transform against brute-force enumeration of every alignment."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch

from ctcspec.search import (
    accepted_by_budget,
    build_tree,
    collapse,
    node_scores,
    prefix_beam_search,
    ranked_nodes,
    slotwise_nodes,
    topk_alignments,
    transform_nodes,
)
from ctcspec.tree import ROOT

BLANK, OTHER = 4, 3  # classes 0..2 are tokens


def brute_force(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    probs = log_probs.exp().tolist()
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for alignment in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
        p = math.prod(probs[f][c] for f, c in enumerate(alignment))
        out[collapse(alignment, BLANK, OTHER)] += p
    return dict(out)


def random_log_probs(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(frames, 5, generator=torch.Generator().manual_seed(seed)).mul(2).log_softmax(-1)


def test_collapse_merges_repeats_deletes_blanks_and_stops_at_other():
    assert collapse([0, 0, BLANK, 1, 1], BLANK, OTHER) == (0, 1)
    assert collapse([0, BLANK, 0], BLANK, OTHER) == (0, 0)
    assert collapse([BLANK, BLANK], BLANK, OTHER) == ()
    assert collapse([2, OTHER, 1], BLANK, OTHER) == (2,)


@pytest.mark.parametrize("seed", range(5))
def test_exhaustive_prefix_beam_search_equals_brute_force(seed):
    log_probs = random_log_probs(4, seed)
    exact = brute_force(log_probs)
    got = prefix_beam_search(log_probs, top_k=5, beam_width=10_000, blank=BLANK, other=OTHER)
    # "other" ends a draft; brute force files those alignments under their prefix, beam search drops
    # the mass after "other" - compare only prefixes that end without it, via total mass per prefix.
    for prefix, p in got.items():
        assert p <= exact[prefix] + 1e-9
    no_other = brute_force(log_probs.clone().index_fill_(1, torch.tensor([OTHER]), -1e9).log_softmax(-1))
    lp = log_probs.clone()
    lp[:, OTHER] = -float("inf")
    got_no_other = prefix_beam_search(lp, top_k=5, beam_width=10_000, blank=BLANK, other=OTHER)
    total = sum(got_no_other.values())
    for prefix, p in got_no_other.items():
        assert p / total == pytest.approx(no_other[prefix], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_topk_alignments_equal_brute_force(seed):
    log_probs = random_log_probs(3, seed)
    got = topk_alignments(log_probs, top_k=5, num_paths=5 ** 3, blank=BLANK, other=OTHER)
    exact = brute_force(log_probs)
    assert got.keys() == exact.keys()
    for prefix in exact:
        assert got[prefix] == pytest.approx(exact[prefix], rel=1e-6)


def test_a_narrow_beam_underestimates_but_never_overestimates():
    log_probs = random_log_probs(6, 7)
    exact = brute_force(log_probs)
    got = prefix_beam_search(log_probs, top_k=3, beam_width=4, blank=BLANK, other=OTHER)
    assert 0 < len(got) <= 4
    for prefix, p in got.items():
        assert p <= exact[prefix] + 1e-9


def test_ranked_nodes_make_an_ancestor_closed_tree_under_the_budget():
    candidates = {(0, 1, 2): 0.3, (0, 1): 0.2, (1,): 0.25, (0, 2): 0.1, (): 0.15}
    scores = node_scores(candidates)
    assert scores[(0,)] == pytest.approx(0.6) and scores[(0, 1)] == pytest.approx(0.5)
    nodes = ranked_nodes(candidates)
    for budget in range(1, len(nodes) + 1):
        tree = build_tree(nodes, budget, token_of_class=[10, 11, 12])
        assert len(tree) == budget
        paths = set(tree.paths())
        for path in paths:  # every kept node's parent is kept
            assert len(path) == 1 or path[:-1] in paths
    tree = build_tree(nodes, 2, token_of_class=[10, 11, 12])
    assert tree.tokens == (10, 11) and tree.parents == (ROOT, 0)


def test_ranked_nodes_respect_max_depth():
    nodes = ranked_nodes({(0, 1, 2, 0): 1.0}, max_depth=2)
    assert nodes == [(0,), (0, 1)]


def test_accepted_by_budget_counts_the_longest_held_prefix():
    nodes = [(0,), (1,), (0, 1), (0, 1, 2), (0, 2)]
    assert accepted_by_budget(nodes, [0, 1, 2, 2], budgets=[1, 2, 3, 4, 5]) == [1, 1, 2, 3, 3]
    assert accepted_by_budget(nodes, [2, 0], budgets=[5]) == [0]
    assert accepted_by_budget(nodes, [], budgets=[5]) == [0]


def test_transform_off_reads_slot_i_as_depth_i_without_blanks():
    """`none` (the ablation): per-slot top-k tree, best nodes first, blank never drafted, no collapsing."""
    gen = torch.Generator().manual_seed(5)
    log_probs = torch.randn(3, 5, generator=gen).log_softmax(-1)  # classes 0..2 tokens, 3 other, 4 blank
    log_probs[0, 4] = 5.0  # the blank is slot 0's favourite: ignored
    nodes = slotwise_nodes(log_probs, blank=4, other=3, tree_budget=12)
    score = {p: sum(float(log_probs[i, c]) for i, c in enumerate(p))
             for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)}
    assert nodes == sorted(score, key=lambda p: -score[p])[:12]
    assert transform_nodes(log_probs, "none", 6, 16, 4, 3, tree_budget=5, max_depth=1) == nodes_at_depth_one(score)


def nodes_at_depth_one(score):
    return sorted((p for p in score if len(p) == 1), key=lambda p: -score[p])
