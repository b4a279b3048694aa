"""What every draft network is built from: the base model's frozen vocabulary pieces, a pre-norm
transformer layer whose queries attend to keys/values the caller holds, and an immutable cache of
those keys/values over context positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def register_draft_vocabulary(module: nn.Module, vocab_ids: torch.Tensor, embed_weight: torch.Tensor,
                              head_weight: torch.Tensor, head_bias: torch.Tensor | None, other_id: int) -> None:
    """The base model's frozen pieces a draft module reads, as non-persistent buffers: its input
    embedding, its LM head rows for the draft vocabulary, and the token id -> class id map (tokens
    outside the vocabulary map to `other_id`)."""
    module.register_buffer("vocab_ids", vocab_ids.to(torch.long), persistent=False)
    module.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
    module.register_buffer("head_weight", head_weight.detach()[vocab_ids], persistent=False)
    bias = head_bias.detach()[vocab_ids] if head_bias is not None else None
    module.register_buffer("head_bias", bias, persistent=False)
    class_of = torch.full((embed_weight.shape[0],), other_id, dtype=torch.long)
    class_of[vocab_ids] = torch.arange(len(vocab_ids))
    module.register_buffer("class_of_token", class_of, persistent=False)


def draft_vocab_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., draft_vocab_size) through the frozen LM head rows, on the drafter's CPU kernels when
    it runs other than the stock ones (cpu_kernels.install_draft_kernels)."""
    head = getattr(module, "kernel_head", None)
    if head is not None:
        return head(x)
    bias = None if module.head_bias is None else module.head_bias.to(x.dtype)
    return F.linear(x, module.head_weight.to(x.dtype), bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    half = head_dim // 2
    return theta ** (-torch.arange(half, dtype=torch.float32) / half)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding; x is (batch, heads, time, head_dim), positions (batch, time)."""
    half = x.shape[-1] // 2
    angles = (positions.to(torch.float32)[..., None] * freqs.float())[:, None]  # (batch, 1, time, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class DraftLayer(nn.Module):
    """A pre-norm transformer layer whose queries (the slots) attend to keys/values given by the caller."""

    def __init__(self, config):
        """config: hidden_size, num_heads, intermediate_size, rope_theta, rms_eps (every module config has them)."""
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_eps)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.rms_eps)
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        freqs = rotary_frequencies(d // config.num_heads, config.rope_theta)
        self.register_buffer("rotary_freqs", freqs, persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.config.num_heads, -1).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attn_norm(x)
        keys = apply_rotary(self._heads(self.k_proj(h)), positions, self.rotary_freqs)
        return keys, self._heads(self.v_proj(h))

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (batch, q, d) at positions (batch, q) -> rotated queries (batch, heads, q, head_dim)."""
        return apply_rotary(self._heads(self.q_proj(self.attn_norm(x))), positions, self.rotary_freqs)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP block, residual included."""
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                allowed: torch.Tensor | None) -> torch.Tensor:
        """x: (batch, q, d); keys/values: (batch, heads, k, head_dim); allowed: bool (batch, 1, q, k), or
        None when every query may see every key."""
        attn = F.scaled_dot_product_attention(self.queries(x, positions), keys, values, attn_mask=allowed)
        return self.feed_forward(x + self.o_proj(attn.transpose(1, 2).reshape(x.shape)))


@dataclass(frozen=True)
class ContextCache:
    """The draft layer's keys/values over context units 0 .. length-1 (immutable; extend() copies)."""
    keys: torch.Tensor    # (1, heads, length, head_dim)
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def extend_context(layer: DraftLayer, cache: ContextCache | None, units: torch.Tensor, start: int) -> ContextCache:
    """A new cache holding `cache` plus the keys/values of `units` (1, m, d) at positions start .. start+m-1;
    the old cache is not touched."""
    positions = torch.arange(start, start + units.shape[1], device=units.device)[None]
    keys, values = layer.keys_values(units, positions)
    if cache is not None:
        if cache.length != start:
            raise ValueError(f"context cache holds {cache.length} positions; cannot extend at {start}")
        keys, values = torch.cat([cache.keys, keys], dim=2), torch.cat([cache.values, values], dim=2)
    return ContextCache(keys, values)


def base_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base model's LM head weight and bias (draft modules read its rows, frozen)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


LAYER_INITS = ("random", "base")  # a draft layer starts random, or as a copy of the base model's last layer
_COPYABLE_BASES = ("llama", "mistral")  # plain pre-norm layers: RMSNorm(weight), no biases, no multipliers


def base_rope_theta(model: nn.Module) -> float:
    """The rotary base of the model's attention (transformers 5 keeps it in rope_parameters)."""
    config = model.config
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ValueError(f"{config.model_type} has no rope_theta")
    return float(theta)


def copy_base_layer(layer: DraftLayer, model: nn.Module) -> None:
    """Start a draft layer as the base model's last decoder layer (as EAGLE and Medusa-2 do): its attention and
    MLP weights and both norms; key/value heads the base shares between query heads (GQA) are repeated."""
    config = model.config
    if config.model_type not in _COPYABLE_BASES:
        raise ValueError(f"copying the last layer needs a {' or '.join(_COPYABLE_BASES)} base model, "
                         f"not {config.model_type}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("the base model's layers have biases, the draft layer has none")
    base = model.get_decoder().layers[-1]
    d, heads = layer.config.hidden_size, layer.config.num_heads
    if getattr(config, "head_dim", d // heads) != d // heads or config.num_attention_heads != heads:
        raise ValueError("the draft layer's heads differ from the base model's")
    if layer.config.intermediate_size != config.intermediate_size:
        raise ValueError("the draft layer's MLP width differs from the base model's")
    repeat = heads // config.num_key_value_heads
    copies = {layer.q_proj: base.self_attn.q_proj, layer.o_proj: base.self_attn.o_proj,
              layer.gate_proj: base.mlp.gate_proj, layer.up_proj: base.mlp.up_proj, layer.down_proj: base.mlp.down_proj,
              layer.attn_norm: base.input_layernorm, layer.mlp_norm: base.post_attention_layernorm}
    with torch.no_grad():
        for target, source in copies.items():
            target.weight.copy_(source.weight)
        for target, source in ((layer.k_proj, base.self_attn.k_proj), (layer.v_proj, base.self_attn.v_proj)):
            target.weight.copy_(source.weight.view(-1, d // heads, d).repeat_interleave(repeat, dim=0).view(d, d))
