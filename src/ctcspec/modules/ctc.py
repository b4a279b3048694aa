"""The attention draft module: one transformer layer over the base model's last hidden states that
predicts N draft slots at once (non-autoregressive).

Context position j contributes a unit u_j = W [h_j ; E(x_{j+1})]: the base model's final (normed)
hidden state fused with the embedding of the token that followed it. With `feature_layers` (EAGLE-3's fused
features), the states of those earlier base layers join it: u_j += W' [norm(h_j^a) ; norm(h_j^b) ...], W' starting
at zero, so a drafter trained without them continues unchanged (a warm start may add them). At the last position t the
next token is the tree's root, already chosen by the base model. The N slots are u_t plus a learned
slot embedding each, at positions t+1 .. t+N; they attend to every context unit and to each other
(bidirectionally or causally). With `num_layers` > 1 further layers refine the slots the same way,
each with its own keys/values over the same context units. Slot outputs go through the base model's
frozen LM head restricted to the draft vocabulary, plus two logits of the module's own: "other" (a
token outside the draft vocabulary, which ends a draft) and the CTC blank. Slot i does not predict
token t+1+i: under CTC the slots emit an alignment (tokens, repeats, blanks) that collapses to the next tokens.

The module keeps no state; the keys/values of context units live in one `ContextCache` per layer that
callers extend (into new tensors) with newly accepted positions.

Training minimises the CTC loss of the K targets, plus optionally (weights 0 by default): a prefix term,
-log P(the draft starts with the first k targets) averaged over k (what is accepted is always a prefix, so
early tokens weigh more), and a soft-target term, the KL divergence from the base model's next-token
distribution (over the draft vocabulary) at each slot that the most likely alignment assigns to a target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctcspec.modules.alignment import IMPOSSIBLE, best_alignment, prefix_log_probs
from ctcspec.modules.layers import (
    ContextCache,
    DraftLayer,
    RMSNorm,
    draft_vocab_logits,
    extend_context,
    register_draft_vocabulary,
)
from ctcspec.search import TRANSFORMS, transform_nodes

SLOT_ATTENTION = ("bidirectional", "causal")
LOSSES = ("ctc", "ce")
TRAINING_ONLY = ("prefix_weight", "soft_weight")  # how a module was trained; its shape and inference ignore them
# What a warm start (train --init-from) may change: the parameters keep their shapes. A bidirectional drafter continues
# as a causal one, for instance (vLLM drafts causally; docs/vllm.md).
WARM_START_FREE = (*TRAINING_ONLY, "slot_attention")
# What a warm start may add to a drafter that had none: new parameters whose contribution starts at zero.
WARM_START_GROWS = ("feature_layers",)
GROWN_PARAMETERS = ("feature_norms.", "feature_fuse.")
LayerCaches = tuple[ContextCache, ...]  # one per draft layer


@dataclass(frozen=True)
class CTCConfig:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    draft_vocab_size: int
    num_slots: int = 6             # N: slots per draft
    target_tokens: int = 4         # K: next tokens each training alignment must spell out
    slot_attention: str = "bidirectional"
    loss: str = "ctc"              # "ce": slot i predicts token t+1+i with cross-entropy (ablation)
    num_layers: int = 1            # draft layers over the slots
    prefix_weight: float = 0.0     # weight of the prefix term beside the CTC loss
    soft_weight: float = 0.0       # weight of the soft-target (KL) term
    feature_layers: tuple[int, ...] = ()  # base layers (HF hidden_states indices) whose states join the last one
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))  # JSON gives a list
        if len(set(self.feature_layers)) != len(self.feature_layers) or any(i < 0 for i in self.feature_layers):
            raise ValueError("feature_layers must be distinct layer indices, each at least 0")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.slot_attention not in SLOT_ATTENTION:
            raise ValueError(f"slot_attention must be one of {SLOT_ATTENTION}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if not 1 <= self.target_tokens <= self.num_slots:
            raise ValueError("need 1 <= target_tokens <= num_slots")
        if self.num_layers < 1:
            raise ValueError("need at least one draft layer")
        if self.prefix_weight < 0 or self.soft_weight < 0:
            raise ValueError("loss weights must not be negative")
        if self.loss == "ce" and (self.prefix_weight or self.soft_weight):
            raise ValueError("the prefix and soft-target terms go with the CTC loss")

    @property
    def other_id(self) -> int:
        return self.draft_vocab_size

    @property
    def blank_id(self) -> int:
        return self.draft_vocab_size + 1

    @property
    def num_classes(self) -> int:
        return self.draft_vocab_size + 2

    def to_dict(self) -> dict:
        return asdict(self)


class CTCModule(nn.Module):
    """Trainable parameters: fuse (and feature_norms, feature_fuse), slot_embed, layer (and more_layers), out_norm,
    extra_head. The base model's input
    embedding and LM head rows (for `vocab_ids`) are frozen buffers, never saved with the drafter."""

    kind = "ctc"
    search_modes = TRANSFORMS  # how drafts are read from the slots; one held-out acceptance curve each
    sequential_search = False  # one slot forward ranks a tree of any size

    def __init__(self, config: CTCConfig, vocab_ids: torch.Tensor, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, head_bias: torch.Tensor | None = None):
        super().__init__()
        if len(vocab_ids) != config.draft_vocab_size:
            raise ValueError("vocab_ids must hold draft_vocab_size token ids")
        d = config.hidden_size
        self.config = config
        self.fuse = nn.Linear(2 * d, d, bias=False)
        if config.feature_layers:
            self.feature_norms = nn.ModuleList(RMSNorm(d, config.rms_eps) for _ in config.feature_layers)
            self.feature_fuse = nn.Linear(len(config.feature_layers) * d, d, bias=False)
            nn.init.zeros_(self.feature_fuse.weight)  # starts as the drafter without them
        self.slot_embed = nn.Parameter(torch.randn(config.num_slots, d) * 0.02)
        self.layer = DraftLayer(config)
        self.more_layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_layers - 1))
        self.out_norm = RMSNorm(d, config.rms_eps)
        self.extra_head = nn.Linear(d, 2)  # [other, blank]
        register_draft_vocabulary(self, vocab_ids, embed_weight, head_weight, head_bias, config.other_id)
        pattern = torch.ones(config.num_slots, config.num_slots, dtype=torch.bool)
        if config.slot_attention == "causal":
            pattern = pattern.tril()
        self.register_buffer("slot_pattern", pattern, persistent=False)  # which slots each slot sees

    @property
    def draft_depth(self) -> int:
        """The deepest draft the module can propose."""
        return self.config.num_slots

    @property
    def target_count(self) -> int:
        """Future tokens per anchor the training loss looks at (x_{t+2} ..)."""
        return self.config.target_tokens

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Base layers whose states the module reads beside the last layer's, concatenated after it in `hidden`."""
        return self.config.feature_layers

    @property
    def layers(self) -> list[DraftLayer]:
        """The draft layers in order; the first keeps its own name, so drafters saved with one layer still load."""
        return [self.layer, *self.more_layers]

    # -- pieces shared by training and inference ------------------------------------------------
    def context_units(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """hidden (batch, t, d × (1 + feature layers)) of positions j: the last layer's states, then each feature
        layer's; next_tokens (batch, t) = x_{j+1}."""
        hidden = hidden.to(self.fuse.weight.dtype)
        d = self.config.hidden_size
        embedded = F.embedding(next_tokens, self.embed_weight).to(hidden.dtype)
        units = self.fuse(torch.cat([hidden[..., :d], embedded], dim=-1))
        if not self.config.feature_layers:
            return units
        features = [norm(hidden[..., (i + 1) * d:(i + 2) * d]) for i, norm in enumerate(self.feature_norms)]
        return units + self.feature_fuse(torch.cat(features, dim=-1))

    def slot_inputs(self, last_units: torch.Tensor) -> torch.Tensor:
        """(..., d) units of the last context position -> (..., N, d) slot inputs."""
        return last_units[..., None, :] + self.slot_embed

    def slot_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        x = self.out_norm(outputs)
        return torch.cat([draft_vocab_logits(self, x), self.extra_head(x)], dim=-1)

    def slot_nodes(self, log_probs: torch.Tensor, tree_budget: int, mode: str, max_depth: int | None = None,
                   top_k: int = 6, beam_width: int = 16) -> list[tuple[int, ...]]:
        """Ranked draft nodes (class-id paths, best first) read from one draft's slot log-probabilities."""
        c = self.config
        return transform_nodes(log_probs, mode, top_k, beam_width, c.blank_id, c.other_id, tree_budget, max_depth)

    # -- inference --------------------------------------------------------------------------------
    def extend(self, caches: LayerCaches | None, units: torch.Tensor, start: int) -> LayerCaches:
        """New caches holding `caches` plus `units` (1, m, d) at positions start .. start+m-1."""
        return tuple(extend_context(layer, cache, units, start)
                     for layer, cache in zip(self.layers, caches or (None,) * len(self.layers), strict=True))

    def draft_log_probs(self, caches: LayerCaches, last_unit: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, classes) of the slots after the caches' last position; last_unit (1, d)."""
        n, length = self.config.num_slots, caches[0].length
        slots = self.slot_inputs(last_unit)  # (1, N, d)
        positions = torch.arange(length, length + n, device=slots.device)[None]
        allowed = None  # bidirectional slots see every context unit and every slot
        if self.config.slot_attention == "causal":
            allowed = torch.cat([torch.ones(n, length, dtype=torch.bool, device=slots.device),
                                 self.slot_pattern], dim=1)[None, None]
        for layer, cache in zip(self.layers, caches, strict=True):
            slot_keys, slot_values = layer.keys_values(slots, positions)
            keys = torch.cat([cache.keys, slot_keys], dim=2)
            values = torch.cat([cache.values, slot_values], dim=2)
            slots = layer(slots, positions, keys, values, allowed)
        return self.slot_logits(slots)[0].float().log_softmax(-1)

    def offline_nodes(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: list[int], tree_budget: int,
                      mode: str) -> list[list[tuple[int, ...]]]:
        """Per anchor of one sequence, the ranked draft nodes inference would propose there."""
        log_probs = self.training_logits(hidden, tokens, torch.tensor([anchors], device=tokens.device))
        log_probs = log_probs.float().log_softmax(-1)[0].cpu()
        return [self.slot_nodes(lp, tree_budget, mode) for lp in log_probs]

    # -- training ---------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        """The training loss (the interface every trainable drafter module shares): the mean over drafts with at
        least one target (targets: class ids (batch, S, K), padded) of CTC (or per-slot cross-entropy) plus the
        weighted prefix and soft-target terms."""
        c = self.config
        keep = target_lengths.reshape(-1) > 0
        logits = self.training_logits(hidden, tokens, anchors).reshape(-1, c.num_slots, c.num_classes)[keep].float()
        targets, lengths = targets.reshape(-1, targets.shape[-1])[keep], target_lengths.reshape(-1)[keep]
        if c.loss == "ce":
            k = min(c.num_slots, targets.shape[1])
            labels = targets[:, :k].masked_fill(torch.arange(k, device=targets.device) >= lengths[:, None], -100)
            return F.cross_entropy(logits[:, :k].reshape(-1, c.num_classes), labels.reshape(-1), ignore_index=-100)
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (N, drafts, classes)
        input_lengths = torch.full_like(lengths, c.num_slots)
        loss = F.ctc_loss(log_probs, targets, input_lengths, lengths, blank=c.blank_id, reduction="mean",
                          zero_infinity=True)
        if c.prefix_weight:
            loss = loss + c.prefix_weight * self.prefix_loss(log_probs, targets, lengths)
        if c.soft_weight:
            rows = torch.arange(anchors.shape[0], device=anchors.device).repeat_interleave(anchors.shape[1])[keep]
            loss = loss + c.soft_weight * self.soft_loss(log_probs, targets, lengths, hidden, rows,
                                                         anchors.reshape(-1)[keep])
        return loss

    def training_logits(self, hidden: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Slot logits (batch, S, N, classes) for drafts anchored at positions `anchors` (batch, S).

        hidden (batch, L, d × (1 + feature layers)) are the base model's states of `tokens` (batch, L); an anchor
        t sees units 0..t, i.e. hidden states up to t and tokens up to t+1 (the root).
        """
        b, length = tokens.shape
        n, s = self.config.num_slots, anchors.shape[1]
        device = hidden.device
        units = self.context_units(hidden[:, :-1], tokens[:, 1:])  # positions 0 .. L-2
        ctx_positions = torch.arange(length - 1, device=device).expand(b, -1)
        last = units.gather(1, anchors[..., None].expand(-1, -1, units.shape[-1]))  # (b, S, d)
        slots = self.slot_inputs(last).reshape(b, s * n, -1)
        slot_positions = (anchors[..., None] + torch.arange(1, n + 1, device=device)).reshape(b, s * n)
        sees_context = ctx_positions[:, None, :] <= anchors.repeat_interleave(n, dim=1)[..., None]  # (b, S*N, L-1)
        group = torch.arange(s, device=device).repeat_interleave(n)
        same_group = group[:, None] == group[None, :]
        pattern = self.slot_pattern.repeat(s, s)
        sees_slots = (same_group & pattern).expand(b, -1, -1)
        allowed = torch.cat([sees_context, sees_slots], dim=2)[:, None]
        for layer in self.layers:
            ctx_keys, ctx_values = layer.keys_values(units, ctx_positions)
            slot_keys, slot_values = layer.keys_values(slots, slot_positions)
            keys = torch.cat([ctx_keys, slot_keys], dim=2)
            values = torch.cat([ctx_values, slot_values], dim=2)
            slots = layer(slots, slot_positions, keys, values, allowed)
        return self.slot_logits(slots).reshape(b, s, n, -1)

    def prefix_loss(self, log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-log P(the draft starts with y_1 .. y_k), averaged over every draft's k = 1 .. length; a prefix too long
        for the N slots (repeats need blanks between them) is left out. log_probs (N, drafts, classes); targets
        (drafts, K)."""
        prefix = prefix_log_probs(log_probs, targets, self.config.blank_id)
        counted = (torch.arange(targets.shape[1], device=targets.device) < lengths[:, None]) & (prefix > IMPOSSIBLE)
        return -(prefix * counted).sum() / counted.sum().clamp(min=1)

    def soft_loss(self, log_probs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor,
                  rows: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Mean of sum_v q(v) (log q(v) - log p(v)) over the draft vocabulary v, where q is the base model's
        next-token distribution renormalised over the draft vocabulary and p the slot's distribution over all its
        classes (so the term also draws mass away from blank and "other"), at each slot the most likely alignment
        gives a target (not "other"): target k of the draft at anchor t is x_{t+2+k}, which the base model
        predicted from its (final, normed) state at t+1+k."""
        c = self.config
        emitted = best_alignment(log_probs.detach(), targets, lengths, c.blank_id)   # (drafts, N)
        drafts, slots = (emitted >= 0).nonzero(as_tuple=True)
        k = emitted[drafts, slots]
        keep = targets[drafts, k] != c.other_id
        drafts, slots, k = drafts[keep], slots[keep], k[keep]
        if not len(k):
            return log_probs.sum() * 0.0
        width, d = hidden.shape[1], c.hidden_size
        where = rows[drafts] * width + anchors[drafts] + 1 + k
        positions, inverse = where.unique(return_inverse=True)
        with torch.no_grad():
            states = hidden[..., :d].reshape(-1, d)[positions].to(self.head_weight.dtype)
            base = draft_vocab_logits(self, states).float().log_softmax(-1)[inverse]
        drafted = log_probs[slots, drafts, :c.draft_vocab_size]
        return (base.exp() * (base - drafted)).sum(-1).mean()
