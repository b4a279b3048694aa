"""The one interface every drafter implements.

Each step the engine hands the drafter a `DraftRequest` (the whole sequence so far; its last token
is the root of the tree, not yet run through the base model) and gets back a `TokenTree` of
proposed continuations. The drafter never needs to be right: the engine verifies every token, so a
bad draft costs time, never correctness.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ctcspec.tree import TokenTree


@dataclass(frozen=True)
class DraftRequest:
    tokens: torch.Tensor                # 1-D int64, prompt + generated; tokens[-1] is the root
    max_depth: int                      # deepest draft the context limit allows
    new_hidden: torch.Tensor | None = None  # base last-layer states of positions accepted since the last
                                            # request (only for drafters with needs_hidden_states)


class Drafter(ABC):
    name: str = "drafter"
    needs_hidden_states: bool = False

    def reset(self) -> None:  # noqa: B027 - optional hook, most drafters keep no per-sequence state
        """Forget per-sequence state; called before every generation."""

    @abstractmethod
    def propose(self, request: DraftRequest) -> TokenTree:
        """Return draft tokens continuing request.tokens (parent -1 = after the root)."""
