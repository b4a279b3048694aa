"""What the baseline drafters (Medusa, Hydra, EAGLE-style) share: a configuration, the frozen output
head over the draft vocabulary, and the best-first tree search that turns their per-depth token
distributions into ranked draft nodes.

Like the CTC module, a baseline module predicts classes: the draft vocabulary's tokens plus one
"other" class (a token outside it, which ends a draft). Its trainable parameters are its own; the
base model's embedding and LM head rows are frozen buffers, taken from the base model at load time.

Search: a node is a tuple of class ids below the root, scored by the sum of its tokens'
log-probabilities. Nodes leave a heap best first, so parents always precede their children and the
first b nodes are the best tree of b nodes a drafter can offer; a node's children are computed only
when it leaves the heap (one small forward for the sequential drafters).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.draft_module import draft_vocab_logits, register_draft_vocabulary

HEAD_KINDS = ("medusa", "hydra", "eagle")


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
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}")
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

    def __init__(self, config: HeadsConfig, vocab_ids: torch.Tensor, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, head_bias: torch.Tensor | None = None):
        super().__init__()
        if len(vocab_ids) != config.draft_vocab_size:
            raise ValueError("vocab_ids must hold draft_vocab_size token ids")
        self.config = config
        self.other_head = nn.Linear(config.hidden_size, 1)
        register_draft_vocabulary(self, vocab_ids, embed_weight, head_weight, head_bias, config.other_id)

    @property
    def target_count(self) -> int:
        """Future tokens per anchor the training loss looks at (x_{t+2} ..)."""
        return self.config.depth

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

    # subclasses: forward(hidden, tokens, anchors, targets, target_lengths) -> loss,
    # search_root(hidden, tokens) -> state, expand(state, class_id | None) -> (state, log_probs)


def anchor_hidden(hidden: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """hidden (b, L, d), anchors (b, S) -> (b, S, d): the base state at each anchor."""
    return hidden.gather(1, anchors[..., None].expand(-1, -1, hidden.shape[-1]))


def following_tokens(tokens: torch.Tensor, anchors: torch.Tensor, count: int) -> torch.Tensor:
    """tokens x_{t+1} .. x_{t+count} after each anchor t (b, S, count), clamped at the sequence end."""
    positions = (anchors[..., None] + torch.arange(1, count + 1, device=tokens.device)).clamp(max=tokens.shape[1] - 1)
    return tokens.gather(1, positions.flatten(1)).view(positions.shape)


Expand = Callable[[Any, int | None], tuple[Any, torch.Tensor]]


def best_first_nodes(root_state: Any, expand: Expand, max_nodes: int, max_depth: int, top_k: int,
                     other_id: int) -> list[tuple[int, ...]]:
    """Up to `max_nodes` draft nodes, best (highest path log-probability) first.

    expand(parent_state, class_id) gives the state of the child reached by class_id and the
    log-probabilities (classes,) of its own children; expand(root_state, None) those of the root.
    "other" is never drafted (the base model will pick a token the drafter cannot name).
    """
    counter = itertools.count()
    heap: list = []

    def push_children(path: tuple[int, ...], score: float, state: Any, log_probs: torch.Tensor) -> None:
        if len(path) >= max_depth:
            return
        log_probs = log_probs.float().clone()
        log_probs[other_id] = float("-inf")
        values, ids = log_probs.topk(min(top_k, log_probs.shape[0] - 1))
        for value, cls in zip(values.tolist(), ids.tolist(), strict=True):
            if value == float("-inf"):  # excluded classes (other; the CTC blank) are never drafted
                break
            heapq.heappush(heap, (-(score + value), next(counter), path + (cls,), state))

    root, log_probs = expand(root_state, None)
    push_children((), 0.0, root, log_probs)
    nodes: list[tuple[int, ...]] = []
    while heap and len(nodes) < max_nodes:
        neg_score, _, path, parent_state = heapq.heappop(heap)
        nodes.append(path)
        if len(nodes) < max_nodes and len(path) < max_depth:  # the last node's children are never needed
            state, log_probs = expand(parent_state, path[-1])
            push_children(path, -neg_score, state, log_probs)
    return nodes
