"""CTC drafts and prompt-lookup copies merged into one tree.

The two are complementary: the CTC drafter predicts the next few tokens from the base model's
features, lookup copies long spans the sequence has already produced (repetitions, quoted text).
Lookup's chains go first, so its nodes survive any truncation; the CTC tree keeps its own budget
(`tree_budget` is the CTC drafter's).
"""

from __future__ import annotations

from dataclasses import replace

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.tree import TokenTree


class CTCLookupDrafter(Drafter):
    name = "ctc+lookup"
    needs_hidden_states = True

    def __init__(self, ctc: CTCDrafter, lookup: LookupDrafter | None = None):
        self.ctc, self.lookup = ctc, lookup or LookupDrafter()
        self.reset()

    @property
    def tree_budget(self) -> int:
        return self.ctc.tree_budget

    @tree_budget.setter
    def tree_budget(self, value: int) -> None:
        self.ctc.tree_budget = value

    @property
    def acceptance_curve(self) -> dict[int, float] | None:
        return self.ctc.acceptance_curve

    def settings(self) -> dict:
        return {**self.ctc.settings(), **{f"lookup_{k}": v for k, v in self.lookup.settings().items()}}

    def reset(self) -> None:
        self.ctc.reset()
        self.lookup.reset()
        self._copied = TokenTree()

    def propose(self, request: DraftRequest) -> TokenTree:
        accepted = request.tokens[len(request.tokens) - 1 - request.accepted:-1].tolist()
        # lookup learns how much of its own tree was kept, not what the CTC nodes added
        copied = self.lookup.propose(replace(request, accepted=self._copied.matched_depth(accepted)))
        drafted = self.ctc.propose(request)
        self._copied = copied
        return TokenTree.from_sequences([*copied.paths(), *drafted.paths()])
