"""Prompt lookup: copy what followed earlier occurrences of the sequence's last n tokens.

No model, no training. Several matches (longest n-gram first, most recent first) are merged into
one tree, so a repeated phrase with different continuations is covered by a branching draft.

A wrong draft is not free: verifying a few extra nodes costs a little more than a one-token forward
(`ctcspec.budget` measures how much on this machine). The drafter therefore keeps, per generation and
per matched n-gram length, the mean number of draft tokens the base model accepted (the engine says
how many, in each request), and drafts only while that expectation reaches `min_expected_accept`
(docs/lookup.md says how the default was chosen). In a batch (batch.py) a tree must also pay for its share of the
batched forward: given `batch_cost` (budget.machine_batch_cost), a tree of n nodes needs an expected
share(1 + n) / share(1) - 1 kept tokens at the step's batch size (pricing.batch_share), which grows with the batch.
"""

from __future__ import annotations

import numpy as np

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.pricing import batch_share, interpolate_cost
from ctcspec.tree import TokenTree


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, draft_len: int = 6,
                 max_matches: int = 3, tree_budget: int = 12, min_expected_accept: float = 1.0,
                 prior_accept: float = 1.5, prior_weight: float = 2.0,
                 batch_cost: dict[int, dict[int, float]] | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.draft_len, self.max_matches, self.tree_budget = draft_len, max_matches, tree_budget
        self.min_expected_accept = min_expected_accept
        self.prior_accept, self.prior_weight = prior_accept, prior_weight
        self.batch_cost = batch_cost
        self._shares: dict[int, dict[int, float]] = {}  # batch_share per batch size: a memo, shared by forks
        self.reset()

    def reset(self) -> None:
        self._last_ngram: int | None = None                              # n-gram length of the last tree
        self._accepted = dict.fromkeys(range(self.max_ngram + 1), 0.0)  # per n: accepted draft tokens
        self._proposed = dict.fromkeys(range(self.max_ngram + 1), 0)    # per n: trees proposed

    def settings(self) -> dict:
        return {"tree_budget": self.tree_budget, "draft_len": self.draft_len,
                "min_expected_accept": self.min_expected_accept,
                **({"priced_for_batches": True} if self.batch_cost else {})}

    def required_accept(self, nodes: int, batch: int) -> float:
        """The expected kept tokens a tree of `nodes` nodes needs at this batch size (see the module docstring)."""
        if not self.batch_cost:
            return self.min_expected_accept
        if batch not in self._shares:
            self._shares[batch] = batch_share(self.batch_cost, batch)
        share = self._shares[batch]
        return max(self.min_expected_accept, interpolate_cost(share, 1 + nodes) / interpolate_cost(share, 1) - 1)

    def expected_accept(self, ngram: int) -> float:
        """Smoothed mean accepted draft length for matches of this n-gram length."""
        return ((self._accepted[ngram] + self.prior_accept * self.prior_weight)
                / (self._proposed[ngram] + self.prior_weight))

    def expected_accept_of_last(self) -> float:
        """What the last proposed tree is expected to keep (0 when it was empty)."""
        return 0.0 if self._last_ngram is None else self.expected_accept(self._last_ngram)

    def propose(self, request: DraftRequest) -> TokenTree:
        if self._last_ngram is not None:  # the engine reports how much of our last tree was kept
            self._accepted[self._last_ngram] += request.accepted
            self._proposed[self._last_ngram] += 1
            self._last_ngram = None
        ids = request.tokens.cpu().numpy()
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            matches = self._continuations(ids, n)
            if not matches:
                continue
            if self.expected_accept(n) < self.min_expected_accept:
                return TokenTree()
            tree = TokenTree.from_sequences(matches, self.tree_budget, min(self.draft_len, request.max_depth))
            if self.expected_accept(n) < self.required_accept(len(tree), request.batch):
                return TokenTree()
            self._last_ngram = n
            return tree
        return TokenTree()

    def _continuations(self, ids: np.ndarray, n: int) -> list[tuple[int, ...]]:
        """Distinct continuations after earlier matches of the last n tokens, most recent first."""
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        found: list[tuple[int, ...]] = []
        for start in starts[::-1]:
            cont = tuple(int(t) for t in ids[start + n: start + n + self.draft_len])
            if cont and cont not in found:
                found.append(cont)
                if len(found) == self.max_matches:
                    break
        return found
