"""The one interface every drafter implements.

Each step the engine hands the drafter a `DraftRequest` (the whole sequence so far; its last token
is the root of the tree, not yet run through the base model; how many draft tokens of the previous
proposal the base model accepted) and gets back a `TokenTree` of proposed continuations. The drafter
never needs to be right: the engine verifies every token, so a bad draft costs time, never correctness.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ctcspec.pricing import BudgetPolicy, FixedBudget
from ctcspec.tree import TokenTree


@dataclass(frozen=True)
class DraftRequest:
    tokens: torch.Tensor                    # 1-D int64, prompt + generated; tokens[-1] is the root
    max_depth: int                          # deepest draft the context limit allows
    accepted: int = 0                       # draft tokens of the previous proposal the base model accepted
                                            # (0 on the first step of a generation)
    new_hidden: torch.Tensor | None = None  # base states of positions accepted since the last request (only
                                            # for drafters with needs_hidden_states): the last layer's, then
                                            # those of its feature_layers, concatenated
    batch: int = 1                          # sequences verified in the same forward (batch.py), this one included


class Drafter(ABC):
    name: str = "drafter"
    drafts: bool = True                            # proposes draft tokens (False: plain decoding, one token a step)
    needs_hidden_states: bool = False
    feature_layers: tuple[int, ...] = ()           # base layers whose states it reads beside the last one's
    acceptance_curve: dict[int, float] | None = None  # held-out mean accepted draft tokens per tree budget

    def reset(self) -> None:  # noqa: B027 - optional hook, most drafters keep no per-sequence state
        """Forget per-sequence state; called before every generation."""

    def fork(self) -> Drafter:
        """A drafter for another sequence (batch.py): the same network and settings, its own per-sequence state. A
        shallow copy, then `reset`: so `reset` must create the per-sequence state anew (rebind, not clear in place),
        as every drafter here does."""
        clone = copy.copy(self)
        clone.reset()
        return clone

    @abstractmethod
    def propose(self, request: DraftRequest) -> TokenTree:
        """Return draft tokens continuing request.tokens (parent -1 = after the root)."""

    def settings(self) -> dict:
        """The options that shape this drafter's trees, for reports."""
        return {}


class BudgetedDrafter(Drafter):
    """A drafter that can draft trees of any size and drafts as many nodes as its `budget` policy says each step
    (pricing.py: fixed, or priced step by step on this machine's measured curves). `budget` is chosen when the
    drafter is assembled (assembly.py) and is not changed while it runs."""
    budget: BudgetPolicy
    shares_tree: bool = False  # its trees also hold another drafter's nodes (the budget is then priced beside them)

    def __init__(self, budget: BudgetPolicy | int):
        self.budget = FixedBudget(budget) if isinstance(budget, int) else budget

    def reset(self) -> None:
        self.budget.reset()

    def fork(self) -> BudgetedDrafter:
        clone = copy.copy(self)
        clone.budget = copy.copy(self.budget)
        clone.reset()
        return clone

    def propose(self, request: DraftRequest) -> TokenTree:
        return self.draft(request, self.budget.next(request.accepted, batch=request.batch))

    @abstractmethod
    def draft(self, request: DraftRequest, tree_budget: int) -> TokenTree:
        """`propose`, with at most `tree_budget` draft nodes of its own (0: none; it still takes in the new states)."""

    def settings(self) -> dict:
        return self.budget.settings()
