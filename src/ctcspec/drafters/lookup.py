"""Prompt lookup: copy what followed earlier occurrences of the sequence's last n tokens.

No model, no training. Several matches (longest n-gram first, most recent first) are merged into
one tree, so a repeated phrase with different continuations is covered by a branching draft.
"""

from __future__ import annotations

import numpy as np

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.tree import TokenTree


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, draft_len: int = 6,
                 max_candidates: int = 3, max_nodes: int = 12):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.draft_len, self.max_candidates, self.max_nodes = draft_len, max_candidates, max_nodes

    def propose(self, request: DraftRequest) -> TokenTree:
        ids = request.tokens.cpu().numpy()
        candidates: list[tuple[int, ...]] = []
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            for cont in self._continuations(ids, n):
                if cont not in candidates:
                    candidates.append(cont)
                if len(candidates) >= self.max_candidates:
                    break
            if len(candidates) >= self.max_candidates:
                break
        return TokenTree.from_sequences(candidates, self.max_nodes, min(self.draft_len, request.max_depth))

    def _continuations(self, ids: np.ndarray, n: int) -> list[tuple[int, ...]]:
        """Continuations after earlier matches of the last n tokens, most recent match first."""
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        found = []
        for start in starts[::-1]:
            cont = ids[start + n: start + n + self.draft_len]
            if len(cont):
                found.append(tuple(int(t) for t in cont))
        return found
