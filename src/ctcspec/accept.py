"""Acceptance: walk the verified tree as the base model decodes it (backends then cut their caches to the path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Acceptance:
    path: list[int]       # verification nodes kept, root (0) first
    tokens: list[int]     # new tokens: the accepted draft tokens, then the base model's own token after the last


def accept_path(node_tokens: list[int], parents: list[int], choose: Callable[[int, list[int]], int]) -> Acceptance:
    """From the root, ask the base model for its next token at the current node (`choose(node, draft tokens from the
    root down to it)`); if a child carries that token, move to the child and ask again, otherwise stop.

    Every emitted token is the base model's own choice after exactly its prefix, greedy or sampled, so the output
    is what decoding without a draft gives (in distribution, when sampling). Draft trees are deduplicated, so at
    most one child carries a token.
    """
    children: dict[tuple[int, int], int] = {}
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[(parent, node_tokens[node])] = node
    path, drafted = [0], []
    while (child := children.get((path[-1], token := choose(path[-1], drafted)))) is not None:
        path.append(child)
        drafted.append(token)
    return Acceptance(path, [*drafted, token])
