"""What the baseline draft networks (Medusa, Hydra, EAGLE-style) share: one configuration, the
frozen output head over the draft vocabulary, the training loss, and the search interface.

Like the CTC module, a baseline module predicts classes: the draft vocabulary's tokens plus one
"other" class (a token outside it, which ends a draft). Its trainable parameters are its own; the
base model's embedding and LM head rows are frozen buffers, taken from the base model at load time.

Each module scores one tree level at a time: search_root(context) -> state, expand(state, class_id)
-> (child state, log-probabilities of its children); `search.best_first_nodes` ranks the nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.modules.layers import draft_vocab_logits, register_draft_vocabulary
from ctcspec.search import module_nodes


@dataclass(frozen=True)
class HeadsConfig:
    kind: str                       # medusa | hydra | eagle
    hidden_size: int
    draft_vocab_size: int
    depth: int = 4                  # medusa/hydra: heads (tree depth); eagle: deepest draft at inference
    intermediate_size: int = 1024   # MLP width of each head (medusa, hydra) or of the layer (eagle)
    num_heads: int = 9              # eagle: attention heads
    feature_weight: float = 1.0     # eagle: weight of the feature regression next to the token loss
    feature_noise: float = 0.1      # eagle: uniform noise on training input features (EAGLE's robustness trick)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError("depth must be at least 1")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")

    @property
    def other_id(self) -> int:
        return self.draft_vocab_size

    @property
    def num_classes(self) -> int:
        return self.draft_vocab_size + 1

    def to_dict(self) -> dict:
        return asdict(self)


class HeadsModule(nn.Module):
    """Base of the baseline modules: frozen restricted LM head + a trainable "other" logit."""

    kind = "heads"
    search_modes = ("search",)  # best first over path log-probabilities; one held-out acceptance curve
    sequential_search = True    # expanding a node runs the module (once per node)
    feature_layers: tuple[int, ...] = ()  # the heads read the base model's last layer only

    def __init__(self, config: HeadsConfig, vocab_ids: torch.Tensor, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, head_bias: torch.Tensor | None = None):
        super().__init__()
        if len(vocab_ids) != config.draft_vocab_size:
            raise ValueError("vocab_ids must hold draft_vocab_size token ids")
        self.config = config
        self.other_head = nn.Linear(config.hidden_size, 1)
        register_draft_vocabulary(self, vocab_ids, embed_weight, head_weight, head_bias, config.other_id)

    @property
    def draft_depth(self) -> int:
        """The deepest draft the module can propose."""
        return self.config.depth

    @property
    def target_count(self) -> int:
        """Future tokens per anchor the training loss looks at (x_{t+2} ..)."""
        return self.config.depth

    def offline_nodes(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int], tree_budget: int,
                      mode: str = "search") -> list[list[tuple[int, ...]]]:
        """Per anchor of one sequence, the ranked draft nodes inference would propose there."""
        contexts = self.offline_contexts(hidden.to(self.embed_weight.dtype), tokens, anchors)
        return [module_nodes(self, context, tree_budget, self.draft_depth) for context in contexts]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_weight).to(self.other_head.weight.dtype)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., classes): the base LM head's rows for the draft vocabulary, then "other"."""
        return torch.cat([draft_vocab_logits(self, x), self.other_head(x)], dim=-1)

    def class_loss(self, logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits (b, S, k, classes) against target classes (b, S, >=k) where k < length."""
        k = logits.shape[2]
        labels = targets[..., :k].masked_fill(torch.arange(k, device=targets.device) >= target_lengths[..., None],
                                              -100)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    # subclasses: forward(hidden, tokens, anchors, targets, target_lengths) -> loss;
    # update_context(context, new_hidden, tokens) -> context (inference) and offline_contexts(hidden, tokens,
    # anchors) -> contexts (evaluation); search_root(context) -> state; expand(state, class_id | None)
    # -> (state, log_probs)


def anchor_hidden(hidden: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """hidden (b, L, d), anchors (b, S) -> (b, S, d): the base state at each anchor."""
    return hidden.gather(1, anchors[..., None].expand(-1, -1, hidden.shape[-1]))


def following_tokens(tokens: torch.Tensor, anchors: torch.Tensor, count: int) -> torch.Tensor:
    """tokens x_{t+1} .. x_{t+count} after each anchor t (b, S, count), clamped at the sequence end."""
    positions = (anchors[..., None] + torch.arange(1, count + 1, device=tokens.device)).clamp(max=tokens.shape[1] - 1)
    return tokens.gather(1, positions.flatten(1)).view(positions.shape)
