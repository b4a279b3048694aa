"""The one interface between the engine and the base model's runtime.

A backend runs tokens through the base model against a KV cache it owns the layout of:
"run these nodes at these positions under this tree mask; return their logits and hidden states
(the last layer's, and any earlier layers' a drafter reads); keep only these cache entries". The engine,
the budget's cost curve and the drafters never touch a cache or a model forward directly, so every backend
serves every drafter (llama.cpp: those reading the last layer only).

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
    hidden: torch.Tensor | None   # (nodes, hidden × (1 + layers)): the last layer's states (after the final norm),
                                  # then those of the layers asked for; None unless asked for


HiddenLayers = tuple[int, ...] | None  # None: no states; (): the last layer's; (a, b): also layers a, b (HF
                                       # hidden_states indices: 0 is the embeddings, i the output of i layers)


def node_depths(parents: list[int]) -> list[int]:
    """Depth of every node given parents over the nodes (-1: the node continues the cached sequence)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


class Backend(ABC):
    """Runs the base model `model` (a loaded HF causal LM: its config, generation config and embeddings
    are what drafters and the engine read) for one sequence at a time."""

    name: str = "backend"
    earlier_layers: bool = True  # can return states of layers before the last (hidden_layers beyond ())

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def new_cache(self, capacity: int):
        """An empty cache for sequences of up to `capacity` entries (prompt + generated + one tree)."""

    @abstractmethod
    def length(self, cache) -> int:
        """Tokens the cache holds."""

    @abstractmethod
    def forward(self, cache, tokens: list[int], parents: list[int],
                hidden_layers: HiddenLayers = None) -> ForwardResult:
        """Run `tokens` as nodes after the cached sequence: node i sits at position length + depth(i) and attends
        to the whole cache, its ancestors and itself (parents[i] < i, -1 for none); their entries are appended.
        `hidden_layers`: which states to return beside the logits."""

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
