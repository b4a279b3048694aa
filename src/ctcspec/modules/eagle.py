"""EAGLE-style drafter: one autoregressive transformer layer over (feature, next token) (Li et al., 2024).

Unit j = W [f_j ; E(x_{j+1})], the base model's final state at j fused with the token that followed
it; the layer attends causally over units and predicts the next feature f_{j+1}, whose LM-head
distribution is the draft of x_{j+2}. Training: token cross-entropy plus a smooth-L1 regression to
the true next feature, on noisy input features. Drafting runs the layer again on each expanded
node's predicted feature and token, with the context's keys/values in an immutable cache extended
only with newly accepted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.modules.heads import HeadsModule, anchor_hidden
from ctcspec.modules.layers import ContextCache, DraftLayer, extend_context


class EagleModule(HeadsModule):
    kind = "eagle"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.fuse = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layer = DraftLayer(config)

    @property
    def target_count(self) -> int:
        return 1  # trained one step ahead; deeper drafts feed back predicted features

    def units(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        features = features.to(self.fuse.weight.dtype)
        return self.fuse(torch.cat([features, self.embed(next_tokens)], dim=-1))

    def forward(self, hidden, tokens, anchors, targets, target_lengths) -> torch.Tensor:
        b, length = tokens.shape
        features = hidden[:, :-1].to(self.fuse.weight.dtype)
        if self.training and self.config.feature_noise:
            features = features + (torch.rand_like(features) * 2 - 1) * self.config.feature_noise
        units = self.units(features, tokens[:, 1:])                       # positions 0 .. L-2
        positions = torch.arange(length - 1, device=tokens.device).expand(b, -1)
        keys, values = self.layer.keys_values(units, positions)
        queries = anchor_hidden(units, anchors)
        allowed = (positions[:, None, :] <= anchors[..., None])[:, None]   # (b, 1, S, L-1)
        predicted = self.layer(queries, anchors, keys, values, allowed)    # f^_{t+1}
        token_loss = self.class_loss(self.class_logits(predicted)[:, :, None], targets, target_lengths)
        truth = anchor_hidden(hidden, anchors + 1).to(predicted.dtype)
        keep = target_lengths > 0
        feature_loss = F.smooth_l1_loss(predicted[keep].float(), truth[keep].float())
        return token_loss + self.config.feature_weight * feature_loss

    # -- search -----------------------------------------------------------------------------------
    def update_context(self, context, new_hidden: torch.Tensor, tokens: torch.Tensor):
        """A new (cache, last unit) holding the newly accepted positions; the old cache is not touched."""
        new = new_hidden.shape[0]
        units = self.units(new_hidden[None], tokens[-new:][None])
        cache = extend_context(self.layer, context[0] if context is not None else None, units, len(tokens) - 1 - new)
        return cache, units[:, -1]

    def offline_contexts(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int]) -> list:
        units = self.units(hidden[:, :-1], tokens[:, 1:])
        positions = torch.arange(units.shape[1], device=units.device)[None]
        keys, values = self.layer.keys_values(units, positions)
        return [(ContextCache(keys[:, :, :t + 1], values[:, :, :t + 1]), units[:, t]) for t in anchors]

    def search_root(self, context):
        cache, last_unit = context
        return cache, last_unit

    def expand(self, state, class_id: int | None):
        """state: (cache, last unit) at the root; (cache, path keys, path values, feature, position) below."""
        if class_id is None:
            cache, unit = state
            position, path_keys, path_values = cache.length - 1, cache.keys[:, :, :0], cache.values[:, :, :0]
            keys, values = cache.keys, cache.values
        else:
            cache, path_keys, path_values, feature, position = state
            token = self.vocab_ids[class_id].reshape(1, 1)
            unit = self.units(feature[None], token)[:, 0]
            position += 1
            k, v = self.layer.keys_values(unit[:, None], torch.tensor([[position]], device=unit.device))
            path_keys, path_values = torch.cat([path_keys, k], dim=2), torch.cat([path_values, v], dim=2)
            keys = torch.cat([cache.keys, path_keys], dim=2)
            values = torch.cat([cache.values, path_values], dim=2)
        feature = self.layer(unit[:, None], torch.tensor([[position]], device=unit.device), keys, values, None)[:, 0]
        log_probs = self.class_logits(feature[0]).float().log_softmax(-1)
        return (cache, path_keys, path_values, feature, position), log_probs
