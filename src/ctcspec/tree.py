"""The token tree a drafter proposes: draft tokens with parent links.

Parent -1 is the tree's root: the last token of the sequence, which the engine has not yet run
through the base model. Nodes are stored parents-first (parents[i] < i), so one pass in index order
visits every node after its parent. Trees are immutable: every transformation returns a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ROOT = -1


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i} has parent {parent}; parents must come before their children")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> TokenTree:
        return cls(tuple(int(t) for t in tokens), tuple(range(-1, len(tokens) - 1)))

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]], tree_budget: int | None = None,
                       max_depth: int | None = None) -> TokenTree:
        """Merge candidate continuations into a trie of at most `tree_budget` nodes; earlier sequences win."""
        children: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        for seq in sequences:
            parent = ROOT
            for depth, token in enumerate(seq, start=1):
                if max_depth is not None and depth > max_depth:
                    break
                key = (parent, int(token))
                node = children.get(key)
                if node is None:
                    if tree_budget is not None and len(tokens) >= tree_budget:
                        break
                    node = len(tokens)
                    children[key] = node
                    tokens.append(int(token))
                    parents.append(parent)
                parent = node
        return cls(tuple(tokens), tuple(parents))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for children of the root."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        return depths

    def paths(self) -> list[tuple[int, ...]]:
        """Token path from the root to each node."""
        paths: list[tuple[int, ...]] = []
        for token, parent in zip(self.tokens, self.parents, strict=True):
            paths.append((paths[parent] if parent != ROOT else ()) + (token,))
        return paths

    def truncated(self, tree_budget: int | None = None, max_depth: int | None = None) -> TokenTree:
        """Keep the first `tree_budget` nodes no deeper than `max_depth` (descendants of dropped nodes go too)."""
        return TokenTree.from_sequences(self.paths(), tree_budget=tree_budget, max_depth=max_depth)

    def matched_depth(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` form a path down from the root."""
        children = {(parent, token): i for i, (token, parent) in enumerate(zip(self.tokens, self.parents, strict=True))}
        node, depth = ROOT, 0
        for token in tokens:
            node = children.get((node, int(token)))
            if node is None:
                break
            depth += 1
        return depth


def is_chain(parents: Sequence[int]) -> bool:
    """Whether nodes with these parents form one chain down from the root (each node the child of the one before)."""
    return all(parent == i - 1 for i, parent in enumerate(parents))
