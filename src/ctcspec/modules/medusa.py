"""Medusa: K independent heads on the base model's last hidden state (Cai et al., 2024).

Head i (1-based) maps h_t, the state that produced the root x_{t+1}, through a residual SiLU MLP
to the frozen LM head and predicts x_{t+1+i}, with cross-entropy. The heads do not see each other's
tokens, so the tree is the best-first product of per-head top-k choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.modules.heads import HeadsModule, anchor_hidden


class ResidualMLP(nn.Module):
    def __init__(self, size: int, inner: int):
        super().__init__()
        self.up = nn.Linear(size, inner)
        self.down = nn.Linear(inner, size)
        nn.init.zeros_(self.down.weight)  # starts as the identity: head i begins as the base LM head
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(x)))


class MedusaModule(HeadsModule):
    kind = "medusa"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.heads = nn.ModuleList(ResidualMLP(config.hidden_size, config.intermediate_size)
                                   for _ in range(config.depth))

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., K, classes)."""
        h = h.to(self.other_head.weight.dtype)
        return torch.stack([self.class_logits(head(h)) for head in self.heads], dim=-2)

    def forward(self, hidden, tokens, anchors, targets, target_lengths) -> torch.Tensor:
        return self.class_loss(self.head_logits(anchor_hidden(hidden, anchors)), targets, target_lengths)

    # -- search -----------------------------------------------------------------------------------
    def update_context(self, context, new_hidden: torch.Tensor, tokens: torch.Tensor):
        """Medusa needs only the state that produced the root."""
        return new_hidden[-1]

    def offline_contexts(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int]) -> list:
        return [hidden[0, t] for t in anchors]

    def search_root(self, context):
        return self.head_logits(context).float().log_softmax(-1), -1

    def expand(self, state, class_id: int | None):
        log_probs, depth = state  # every head's log-probabilities; the depth of the node expanded
        return (log_probs, depth + 1), log_probs[min(depth + 1, len(log_probs) - 1)]
