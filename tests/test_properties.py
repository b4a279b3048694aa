"""Property tests (hypothesis) of the pieces every step relies on: tries, acceptance, cache compaction.

Each property is checked against a brute-force restatement of what the piece promises, on random
inputs hypothesis chooses (and shrinks when one fails).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from ctcspec.accept import accept_path
from ctcspec.backends.hf import compact_cache
from ctcspec.tree import ROOT, TokenTree
from ctcspec.verify import node_parents

TOKENS = st.integers(min_value=0, max_value=5)  # a small alphabet: sequences share prefixes often
SEQUENCES = st.lists(st.lists(TOKENS, min_size=1, max_size=6), max_size=8)
LIMITS = st.one_of(st.none(), st.integers(min_value=0, max_value=12))


def prefixes(sequences, max_depth=None) -> list[tuple[int, ...]]:
    """Every distinct non-empty prefix, in first-appearance order (what a trie of the sequences holds)."""
    seen: list[tuple[int, ...]] = []
    for seq in sequences:
        for depth in range(1, len(seq) + 1):
            if max_depth is not None and depth > max_depth:
                break
            if tuple(seq[:depth]) not in seen:
                seen.append(tuple(seq[:depth]))
    return seen


@given(SEQUENCES, LIMITS, LIMITS)
def test_a_trie_holds_each_prefix_once_within_its_budget(sequences, tree_budget, max_depth):
    tree = TokenTree.from_sequences(sequences, tree_budget=tree_budget, max_depth=max_depth)
    paths = tree.paths()
    assert len(set(paths)) == len(paths)                                 # each prefix once (a trie)
    assert all(p[:-1] in paths[:i] or len(p) == 1 for i, p in enumerate(paths))  # parents first
    assert tree_budget is None or len(tree) <= tree_budget
    assert max_depth is None or all(len(p) <= max_depth for p in paths)
    assert set(paths) <= set(prefixes(sequences, max_depth))
    if tree_budget is None:
        assert set(paths) == set(prefixes(sequences, max_depth))


@given(SEQUENCES, st.integers(min_value=0, max_value=12), st.integers(min_value=1, max_value=6))
def test_truncation_keeps_an_ancestor_closed_prefix_of_the_nodes(sequences, tree_budget, max_depth):
    tree = TokenTree.from_sequences(sequences)
    cut = tree.truncated(tree_budget, max_depth)
    kept = cut.paths()
    assert len(cut) <= tree_budget and all(len(p) <= max_depth for p in kept)
    assert set(kept) <= set(tree.paths())
    assert all(len(p) == 1 or p[:-1] in kept for p in kept)


@given(SEQUENCES, st.lists(TOKENS, max_size=8))
def test_matched_depth_is_the_longest_prefix_in_the_tree(sequences, tokens):
    tree = TokenTree.from_sequences(sequences)
    paths = set(tree.paths())
    expected = max([d for d in range(1, len(tokens) + 1) if tuple(tokens[:d]) in paths], default=0)
    assert tree.matched_depth(tokens) == expected


@given(SEQUENCES, TOKENS, st.lists(TOKENS, min_size=50, max_size=50))
def test_acceptance_is_the_longest_path_the_base_model_agrees_with(sequences, root, greedy_pool):
    tree = TokenTree.from_sequences(sequences)
    node_tokens = [root, *tree.tokens]
    greedy = greedy_pool[: len(node_tokens)]  # the base model's argmax after each verification node
    accepted = accept_path(node_tokens, node_parents(tree), lambda node, _: greedy[node])
    # brute force: a draft path is accepted when each of its tokens is the argmax after its parent node
    paths = tree.paths()

    def agreed(i: int) -> bool:
        parent = tree.parents[i]
        before = 0 if parent == ROOT else parent + 1
        return greedy[before] == tree.tokens[i] and (parent == ROOT or agreed(parent))

    best = max((len(paths[i]) for i in range(len(tree)) if agreed(i)), default=0)
    assert len(accepted.tokens) == best + 1
    assert accepted.tokens[:-1] == list(max((paths[i] for i in range(len(tree)) if agreed(i)), key=len, default=()))
    assert accepted.tokens[-1] == greedy[accepted.path[-1]]                  # the base model's own next token


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=6), st.integers(min_value=1, max_value=8), st.data())
def test_compaction_keeps_the_context_and_the_path_in_order(past_len, nodes, data):
    path = [0] + sorted(data.draw(st.sets(st.integers(min_value=1, max_value=nodes - 1), max_size=nodes - 1))
                        if nodes > 1 else set())
    cache = DynamicCache()
    keys = torch.randn(1, 2, past_len + nodes, 4)
    values = torch.randn(1, 2, past_len + nodes, 4)
    for layer in range(2):
        cache.update(keys + layer, values - layer, layer)
    compact_cache(cache, past_len, path)
    keep = list(range(past_len)) + [past_len + n for n in path]
    for layer_index, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.keys, (keys + layer_index)[:, :, keep])
        torch.testing.assert_close(layer.values, (values - layer_index)[:, :, keep])
