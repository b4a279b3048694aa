"""Hydra: sequentially dependent draft heads (Ankner et al., 2024).

Head i (1-based) predicts x_{t+1+i} from h_t and the embeddings of every token before it in the
draft, x_{t+1} (the root) .. x_{t+i}: x = h_t + W_i [E(x_{t+1}); ..; E(x_{t+i})], then a residual
SiLU MLP and the frozen LM head. Training feeds the true tokens (teacher forcing); drafting feeds
the tree's own tokens, one small forward per expanded node.
"""

from __future__ import annotations

import torch
from torch import nn

from ctcspec.modules.heads import HeadsModule, anchor_hidden, following_tokens
from ctcspec.modules.medusa import ResidualMLP


class HydraModule(HeadsModule):
    kind = "hydra"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        d = config.hidden_size
        self.token_proj = nn.ModuleList(nn.Linear(i * d, d, bias=False) for i in range(1, config.depth + 1))
        self.heads = nn.ModuleList(ResidualMLP(d, config.intermediate_size) for _ in range(config.depth))

    def head_logits(self, i: int, h: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Head i (0-based) on h (..., d) and the embeddings of the i+1 tokens before it (..., i+1, d)."""
        x = h.to(self.other_head.weight.dtype) + self.token_proj[i](prefix.flatten(-2))
        return self.class_logits(self.heads[i](x))

    def forward(self, hidden, tokens, anchors, targets, target_lengths) -> torch.Tensor:
        h = anchor_hidden(hidden, anchors)
        prefix = self.embed(following_tokens(tokens, anchors, self.config.depth))  # (b, S, K, d)
        logits = torch.stack([self.head_logits(i, h, prefix[..., :i + 1, :]) for i in range(self.config.depth)],
                             dim=2)
        return self.class_loss(logits, targets, target_lengths)

    # -- search -----------------------------------------------------------------------------------
    def update_context(self, context, new_hidden: torch.Tensor, tokens: torch.Tensor):
        return new_hidden[-1], tokens[-1]

    def offline_contexts(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int]) -> list:
        return [(hidden[0, t], tokens[0, t + 1]) for t in anchors]

    def search_root(self, context):
        h, root = context
        return h, self.embed(root.reshape(1))  # state: h_t and the draft's token embeddings so far

    def expand(self, state, class_id: int | None):
        h, prefix = state
        if class_id is not None:
            token = self.vocab_ids[class_id].reshape(1)
            prefix = torch.cat([prefix, self.embed(token)])
        depth = min(len(prefix), self.config.depth) - 1
        return (h, prefix), self.head_logits(depth, h, prefix[:depth + 1]).float().log_softmax(-1)
