"""CTC drafts and prompt-lookup copies merged into one tree.

The two are complementary: the CTC drafter predicts the next few tokens from the base model's
features, lookup copies long spans the sequence has already produced (repetitions, quoted text).
Lookup's chains go first, so its nodes survive any truncation; `budget` is the CTC drafter's.

Lookup drafts first, so the CTC budget is asked for knowing the tree it joins: a priced budget
(pricing.PricedBudget, what assembly.py gives) counts lookup's nodes in the verification cost and makes
the CTC nodes earn their cost beside what lookup's copy is expected to keep (the step keeps the better
of the two), and learns from what the CTC part alone kept.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from ctcspec.drafters.base import BudgetedDrafter, DraftRequest
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.pricing import BudgetPolicy
from ctcspec.tree import TokenTree


class CTCLookupDrafter(BudgetedDrafter):
    name = "ctc+lookup"
    needs_hidden_states = True
    shares_tree = True

    def __init__(self, ctc: CTCDrafter, lookup: LookupDrafter | None = None):
        self.ctc, self.lookup = ctc, lookup or LookupDrafter()
        self.feature_layers = ctc.feature_layers
        self.reset()

    @property
    def budget(self) -> BudgetPolicy:
        return self.ctc.budget

    @budget.setter
    def budget(self, policy: BudgetPolicy) -> None:
        self.ctc.budget = policy

    @property
    def acceptance_curve(self) -> dict[int, float] | None:
        return self.ctc.acceptance_curve

    def settings(self) -> dict:
        """The CTC drafter's and lookup's settings."""
        return {**self.ctc.settings(), **{f"lookup_{k}": v for k, v in self.lookup.settings().items()}}

    def reset(self) -> None:
        self.ctc.reset()
        self.lookup.reset()
        self._copied, self._drafted = TokenTree(), TokenTree()

    def fork(self) -> CTCLookupDrafter:
        clone = copy.copy(self)
        clone.ctc, clone.lookup = self.ctc.fork(), self.lookup.fork()
        clone.reset()
        return clone

    def propose(self, request: DraftRequest) -> TokenTree:
        copied, ctc_kept = self._copy(request)
        budget = self.budget.next(ctc_kept, len(copied), self.lookup.expected_accept_of_last(), request.batch)
        return self._merge(request, copied, budget)

    def draft(self, request: DraftRequest, tree_budget: int) -> TokenTree:
        return self._merge(request, self._copy(request)[0], tree_budget)

    def _copy(self, request: DraftRequest) -> tuple[TokenTree, int]:
        """Lookup's tree for this step, and how many of the last step's CTC nodes the base model kept."""
        accepted = request.tokens[len(request.tokens) - 1 - request.accepted:-1].tolist()
        # lookup learns how much of its own tree was kept, not what the CTC nodes added
        copied = self.lookup.propose(replace(request, accepted=self._copied.matched_depth(accepted)))
        return copied, self._drafted.matched_depth(accepted)

    def _merge(self, request: DraftRequest, copied: TokenTree, tree_budget: int) -> TokenTree:
        drafted = self.ctc.draft(request, tree_budget)  # at budget 0 it only keeps the new hidden states for later
        self._copied, self._drafted = copied, drafted
        return TokenTree.from_sequences([*copied.paths(), *drafted.paths()])
