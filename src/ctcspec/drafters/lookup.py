"""Prompt lookup: copy what followed earlier occurrences of the sequence's last n tokens.

No model, no training. Several matches (longest n-gram first, most recent first) are merged into
one tree, so a repeated phrase with different continuations is covered by a branching draft.

On a CPU a verification forward over a few draft tokens costs ~1.5-2x a one-token forward
(`ctcspec.costs`), so a wrong draft is not free. The drafter therefore keeps, per generation and
per matched n-gram length, the mean number of draft tokens the base model accepted, and drafts
only while that expectation exceeds `min_expected_accept`: 1.0 by default, a little above the
0.5-0.9 extra forward cost of a small tree, picked with scripts/sweep_lookup.py (docs/lookup.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.tree import ROOT, TokenTree


@dataclass(frozen=True)
class _Proposal:
    seq_len: int       # length of request.tokens when the tree was proposed
    ngram: int         # n-gram length that produced it
    tree: TokenTree


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, draft_len: int = 6,
                 max_candidates: int = 3, max_nodes: int = 12, min_expected_accept: float = 1.0,
                 prior_accept: float = 1.5, prior_weight: float = 2.0):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.draft_len, self.max_candidates, self.max_nodes = draft_len, max_candidates, max_nodes
        self.min_expected_accept = min_expected_accept
        self.prior_accept, self.prior_weight = prior_accept, prior_weight
        self.reset()

    def reset(self) -> None:
        self._last: _Proposal | None = None
        self._accepted = dict.fromkeys(range(self.max_ngram + 1), 0.0)  # per n: accepted draft tokens
        self._proposed = dict.fromkeys(range(self.max_ngram + 1), 0)    # per n: trees proposed

    def expected_accept(self, ngram: int) -> float:
        """Smoothed mean accepted draft length for matches of this n-gram length."""
        return ((self._accepted[ngram] + self.prior_accept * self.prior_weight)
                / (self._proposed[ngram] + self.prior_weight))

    def propose(self, request: DraftRequest) -> TokenTree:
        ids = request.tokens.cpu().numpy()
        self._learn_from(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            candidates = self._continuations(ids, n)
            if not candidates:
                continue
            if self.expected_accept(n) < self.min_expected_accept:
                return TokenTree()
            tree = TokenTree.from_sequences(candidates, self.max_nodes, min(self.draft_len, request.max_depth))
            self._last = _Proposal(len(ids), n, tree)
            return tree
        return TokenTree()

    def _learn_from(self, ids: np.ndarray) -> None:
        """Count how many tokens of the previous draft the base model accepted."""
        last, self._last = self._last, None
        if last is None or len(ids) <= last.seq_len:
            return
        children = {(p, t): i for i, (t, p) in enumerate(zip(last.tree.tokens, last.tree.parents, strict=True))}
        node, accepted = ROOT, 0
        for token in ids[last.seq_len:].tolist():
            node = children.get((node, token))
            if node is None:
                break
            accepted += 1
        self._accepted[last.ngram] += accepted
        self._proposed[last.ngram] += 1

    def _continuations(self, ids: np.ndarray, n: int) -> list[tuple[int, ...]]:
        """Distinct continuations after earlier matches of the last n tokens, most recent first."""
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        found: list[tuple[int, ...]] = []
        for start in starts[::-1]:
            cont = tuple(int(t) for t in ids[start + n: start + n + self.draft_len])
            if cont and cont not in found:
                found.append(cont)
                if len(found) == self.max_candidates:
                    break
        return found
