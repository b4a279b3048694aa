"""CTC drafts and prompt-lookup copies merged into one tree.

The two are complementary: the CTC drafter predicts the next few tokens from the base model's
features, lookup copies long spans the sequence has already produced (repetitions, quoted text).
Lookup's chains go first, so its nodes survive any truncation; the CTC tree keeps its own budget.
"""

from __future__ import annotations

from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.ctc import CTCDrafter
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.tree import TokenTree


class CTCLookupDrafter(Drafter):
    name = "ctc+lookup"
    needs_hidden_states = True

    def __init__(self, ctc: CTCDrafter, lookup: LookupDrafter | None = None):
        self.ctc, self.lookup = ctc, lookup or LookupDrafter()

    @property
    def tree_budget(self) -> int:
        return self.ctc.tree_budget

    def reset(self) -> None:
        self.ctc.reset()
        self.lookup.reset()

    def propose(self, request: DraftRequest) -> TokenTree:
        copied = self.lookup.propose(request)
        drafted = self.ctc.propose(request)
        return TokenTree.from_sequences([*copied.paths(), *drafted.paths()])
