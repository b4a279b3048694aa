"""The one interface between the engine and the base model's runtime.

A backend runs tokens through the base model against a KV cache it owns the layout of:
"run these nodes at these positions under this tree mask; return their logits and last hidden
states; keep only these cache entries". The engine, the budget's cost curve and the drafters never
touch a cache or a model forward directly, so every backend serves every drafter.

Cache invariant: a cache holds the keys/values of `length(cache)` tokens, at positions 0..length-1
in order. `forward` appends one entry per node (in node order, at slots length.., whatever the
node's position); `keep` then cuts the cache back to its first `past_len` entries plus the chosen
nodes, in the order given, so the invariant holds again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardResult:
    logits: torch.Tensor          # (nodes, vocab): the base model's next-token logits after each node
    hidden: torch.Tensor | None   # (nodes, hidden): last-layer states (after the final norm), if asked for


def node_depths(parents: list[int]) -> list[int]:
    """Depth of every node given parents over the nodes (-1: the node continues the cached sequence)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


def is_chain(parents: list[int]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


class Backend(ABC):
    """Runs the base model `model` (a loaded HF causal LM: its config, generation config and embeddings
    are what drafters and the engine read) for one sequence at a time."""

    name: str = "backend"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def new_cache(self, capacity: int):
        """An empty cache for sequences of up to `capacity` entries (prompt + generated + one tree)."""

    @abstractmethod
    def length(self, cache) -> int:
        """Tokens the cache holds."""

    @abstractmethod
    def forward(self, cache, tokens: list[int], parents: list[int], want_hidden: bool = False) -> ForwardResult:
        """Run `tokens` as nodes after the cached sequence: node i sits at position length + depth(i) and attends
        to the whole cache, its ancestors and itself (parents[i] < i, -1 for none); their entries are appended."""

    @abstractmethod
    def keep(self, cache, past_len: int, nodes: list[int]) -> None:
        """Cut the cache to its first `past_len` entries followed by the entries of `nodes` (indices into the
        last forward's nodes, ascending), in that order."""

    @abstractmethod
    def entries(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live (keys, values) of every layer, each (1, kv_heads, length, head_dim): for checks, not speed."""

    def context_limit(self, max_context: int) -> tuple[int, str]:
        """Entries a cache may hold, and what limits it (for error messages)."""
        return max_context, f"the model's context holds {max_context}"

    def describe(self) -> dict:
        """What shapes this backend's speed, for reports and the cost-curve cache key."""
        return {"backend": self.name}
