"""CTC drafts and prompt-lookup copies merged into one tree.

The two are complementary: the CTC drafter predicts the next few tokens from the base model's
features, lookup copies long spans the sequence has already produced (repetitions, quoted text).
Lookup's chains go first, so its nodes survive any truncation; `tree_budget` is the CTC drafter's.

Priced (`priced(plan)`, what the CLI does), the CTC budget is chosen every step for the merged tree:
lookup's nodes count in the verification cost, and the CTC nodes must earn their cost beside what
lookup's copy is expected to keep (the step keeps the better of the two). The held-out acceptance is
scaled by what the CTC part has kept so far in this generation; a budget of 0 drafts no CTC nodes, and
after `probe_every` such steps one step drafts at the plan's best budget to keep measuring.
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

    def __init__(self, ctc: CTCDrafter, lookup: LookupDrafter | None = None, prior_steps: float = 4.0,
                 probe_every: int = 8):
        self.ctc, self.lookup = ctc, lookup or LookupDrafter()
        self.feature_layers = ctc.feature_layers
        self.plan = None
        self.prior_steps, self.probe_every = prior_steps, probe_every
        self.reset()

    def priced(self, plan) -> CTCLookupDrafter:
        self.plan = plan
        return self

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
        """The CTC drafter's and lookup's settings; `priced`: the CTC budget is re-chosen every step (tree_budget is
        then the budget chosen before the first step)."""
        return {**self.ctc.settings(), **{f"lookup_{k}": v for k, v in self.lookup.settings().items()},
                "priced": self.plan is not None}

    def reset(self) -> None:
        self.ctc.reset()
        self.lookup.reset()
        self._copied, self._drafted = TokenTree(), TokenTree()
        self._ctc_accepted = self._ctc_expected = 0.0  # CTC draft tokens kept / expected, this generation
        self._idle_steps = self._last_budget = 0

    def propose(self, request: DraftRequest) -> TokenTree:
        accepted = request.tokens[len(request.tokens) - 1 - request.accepted:-1].tolist()
        # lookup learns how much of its own tree was kept, not what the CTC nodes added
        copied = self.lookup.propose(replace(request, accepted=self._copied.matched_depth(accepted)))
        if self.plan is not None:
            self.ctc.tree_budget = self._priced_budget(accepted, copied)
        drafted = self.ctc.propose(request)  # at budget 0 it only keeps the new hidden states for later
        self._copied, self._drafted = copied, drafted
        return TokenTree.from_sequences([*copied.paths(), *drafted.paths()])

    def _priced_budget(self, accepted: list[int], copied: TokenTree) -> int:
        """The CTC budget for a tree that also holds `copied`, after the last step kept `accepted`."""
        if self._last_budget:
            self._ctc_accepted += self._drafted.matched_depth(accepted)
            self._ctc_expected += self.plan.acceptance[self._last_budget]
        scale = self.plan.scale(self._ctc_accepted, self._ctc_expected, self.prior_steps)
        budget = self.plan.best_or_none(scale, len(copied), self.lookup.expected_accept_of_last())
        self._idle_steps = 0 if budget else self._idle_steps + 1
        if not budget and self._idle_steps % self.probe_every == 0:
            budget = self.plan.best(scale)
        self._last_budget = budget
        return budget
