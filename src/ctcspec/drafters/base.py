"""The one interface every drafter implements.

Each step the engine hands the drafter a `DraftRequest` (the whole sequence so far; its last token
is the root of the tree, not yet run through the base model; how many draft tokens of the previous
proposal the base model accepted) and gets back a `TokenTree` of proposed continuations. The drafter
never needs to be right: the engine verifies every token, so a bad draft costs time, never correctness.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

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


class Drafter(ABC):
    name: str = "drafter"
    drafts: bool = True                            # proposes draft tokens (False: plain decoding, one token a step)
    needs_hidden_states: bool = False
    feature_layers: tuple[int, ...] = ()           # base layers whose states it reads beside the last one's
    tree_budget: int | None = None                 # draft nodes per step, for drafters that take a budget
    acceptance_curve: dict[int, float] | None = None  # held-out mean accepted draft tokens per tree budget

    def reset(self) -> None:  # noqa: B027 - optional hook, most drafters keep no per-sequence state
        """Forget per-sequence state; called before every generation."""

    @abstractmethod
    def propose(self, request: DraftRequest) -> TokenTree:
        """Return draft tokens continuing request.tokens (parent -1 = after the root)."""

    def priced(self, plan) -> Drafter:
        """This drafter, sizing its trees step by step with `plan` (budget.BudgetPlan: this machine's verification
        cost curve, the held-out acceptance and drafting time per budget) where it can; most drafters draft at
        their fixed `tree_budget` and return themselves unchanged."""
        return self

    def settings(self) -> dict:
        """The options that shape this drafter's trees, for reports."""
        return {} if self.tree_budget is None else {"tree_budget": self.tree_budget}
