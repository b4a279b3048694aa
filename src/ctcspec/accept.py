"""Acceptance: the longest root-to-node path the base model agrees with (backends cut their caches to it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Acceptance:
    path: list[int]       # verification nodes kept, root (0) first
    tokens: list[int]     # new tokens: the accepted draft tokens, then the base model's next token


def accept_longest_path(node_tokens: list[int], parents: list[int], greedy: list[int]) -> Acceptance:
    """Walk from the root, moving to the child whose token equals the base model's greedy choice.

    Draft trees are deduplicated, so at most one child can match at each step.
    """
    children: dict[tuple[int, int], int] = {}
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[(parent, node_tokens[node])] = node
    path = [0]
    while (child := children.get((path[-1], greedy[path[-1]]))) is not None:
        path.append(child)
    tokens = [node_tokens[n] for n in path[1:]] + [greedy[path[-1]]]
    return Acceptance(path, tokens)
