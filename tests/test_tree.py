import pytest
import torch

from ctcspec.backends.hf import tree_attention_mask
from ctcspec.tree import ROOT, TokenTree, is_chain
from ctcspec.verify import node_parents


def test_from_sequences_merges_shared_prefixes():
    tree = TokenTree.from_sequences([[5, 6, 7], [5, 6, 8], [9]])
    assert tree.tokens == (5, 6, 7, 8, 9)
    assert tree.parents == (ROOT, 0, 1, 1, ROOT)
    assert tree.depths() == [1, 2, 3, 3, 1]
    assert tree.paths() == [(5,), (5, 6), (5, 6, 7), (5, 6, 8), (9,)]


def test_truncated_merges_duplicate_siblings_and_their_subtrees():
    tree = TokenTree((5, 5, 6, 6, 7), (ROOT, ROOT, 0, 1, 3))
    dedup = tree.truncated()
    assert dedup.tokens == (5, 6, 7)
    assert dedup.parents == (ROOT, 0, 1)


def test_truncated_respects_node_and_depth_budgets():
    tree = TokenTree.from_sequences([[1, 2, 3, 4], [1, 5], [6, 7]])
    assert tree.truncated(max_depth=2).paths() == [(1,), (1, 2), (1, 5), (6,), (6, 7)]
    assert len(tree.truncated(tree_budget=3)) == 3
    assert tree.truncated(tree_budget=0) == TokenTree()


def test_invalid_parent_order_is_rejected():
    with pytest.raises(ValueError):
        TokenTree((1, 2), (1, ROOT))
    with pytest.raises(ValueError):
        TokenTree((1,), ())


def test_chain_detection():
    assert is_chain(TokenTree.chain([1, 2, 3]).parents)
    assert is_chain(TokenTree().parents)
    assert not is_chain(TokenTree.from_sequences([[1], [2]]).parents)


def test_attention_mask_lets_each_node_see_context_and_ancestors_only():
    tree = TokenTree.from_sequences([[5, 6], [7]])       # nodes: root, 5, 6, 7
    parents = node_parents(tree)
    assert parents == [-1, 0, 1, 0]
    mask = tree_attention_mask(parents, past_len=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 4, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    assert mask.min() == torch.finfo(torch.float32).min
