"""A lean forward for Llama-family models (Llama, SmolLM2, Qwen2) on a preallocated KV cache.

The HF forward is general: per call it builds masks and position tensors through several layers of
dispatch, grows the cache by concatenation and re-slices it to compact it. For the few-token
forwards speculative decoding makes on a CPU, that Python and allocation work is a large share of
the step (docs/kernels.md, "Where the time goes"). This backend runs the same modules (the model's
own norms, projections — packed or not — rotary embedding and MLPs) in one flat loop, writes keys
and values into per-layer buffers allocated per generation (doubled if a long one outgrows them),
and compacts by copying the accepted rows down in place. The arithmetic is the HF model's; only the
attention call and the summation order inside it may differ, as they do between HF's own attention
implementations, and decoding stays token-identical to HF `generate` (tests/test_backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ctcspec.backends.base import Backend, ForwardResult, HiddenLayers, node_depths
from ctcspec.backends.hf import check_supported, tree_attention_mask
from ctcspec.cpu_kernels import linear_kernels_of
from ctcspec.errors import CtcspecError
from ctcspec.tree import is_chain

SUPPORTED_TYPES = ("llama", "qwen2")  # model_type values whose decoder layers this loop reproduces exactly


def static_support_problem(model: torch.nn.Module) -> str | None:
    """Why this backend cannot run `model` exactly, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window layers"
    if getattr(config, "_attn_implementation", None) != "sdpa":  # eager rounds differently (softmax in fp32)
        return f"attention implementation {config._attn_implementation!r} is not sdpa"
    return None


@dataclass
class StaticCache:
    """Per-layer key/value buffers of shape (1, kv_heads, capacity, head_dim); entries 0..length-1 are live.
    A forward that would pass `capacity` first moves the live entries into buffers twice as large."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    capacity: int = field(init=False)

    def __post_init__(self) -> None:
        self.capacity = self.keys[0].shape[2]


def unpack(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(nodes, ...) in row-major order of `real`'s True entries -> (rows, q, ...), zero where `real` is False."""
    out = packed.new_zeros(*real.shape, *packed.shape[1:])
    out[real] = packed
    return out


def few_wide_rows(real: torch.Tensor) -> torch.Tensor | None:
    """The rows with more than one real node, when they are at most half of the rows (else None: attend padded)."""
    wide = (real.sum(dim=1) > 1).nonzero()[:, 0]
    return wide if real.shape[1] > 1 and 0 < len(wide) <= real.shape[0] // 2 else None


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float, wide: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (rows, heads, q, head_dim) queries. With `wide` (few_wide_rows), every row's first query runs in
    one call and only the wide rows' others in a second: a batch where one sequence verifies a tree does not pay
    attention over the padding of all the others (their padded queries' outputs are left zero, and never read)."""
    if wide is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=True)
    out = query.new_zeros(query.shape)
    out[:, :, :1] = F.scaled_dot_product_attention(query[:, :, :1], keys, values, attn_mask=mask[:, :, :1],
                                                   scale=scale, enable_gqa=True)
    out[wide, :, 1:] = F.scaled_dot_product_attention(query[wide, :, 1:], keys[wide], values[wide],
                                                      attn_mask=mask[wide, :, 1:], scale=scale, enable_gqa=True)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticBackend(Backend):
    """Llama-family forward over a preallocated cache; refuses other models (use HFBackend for them)."""

    name = "static"

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        problem = static_support_problem(model)
        if problem:
            raise CtcspecError(f"the static backend cannot run this model: {problem} (use --backend hf)")
        super().__init__(model)
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads

    def new_cache(self, capacity: int) -> StaticCache:
        param = self.decoder.embed_tokens.weight
        shape = (1, self.kv_heads, capacity, self.head_dim)
        return StaticCache([torch.empty(shape, dtype=param.dtype, device=param.device) for _ in self.layers],
                           [torch.empty(shape, dtype=param.dtype, device=param.device) for _ in self.layers])

    def length(self, cache: StaticCache) -> int:
        return cache.length

    def _mask(self, parents: list[int], past_len: int) -> tuple[torch.Tensor | None, bool]:
        """(additive mask, is_causal) for scaled_dot_product_attention."""
        if len(parents) == 1:
            return None, False  # one node attends to everything cached and to itself
        if past_len == 0 and is_chain(parents):
            return None, True
        return tree_attention_mask(parents, past_len, self.model.dtype, self.model.device), False

    @torch.inference_mode()
    def forward(self, cache: StaticCache, tokens: list[int], parents: list[int],
                hidden_layers: HiddenLayers = None) -> ForwardResult:
        """Backend.forward; len(tokens) == len(parents). A causal mask (no tree mask) is used only for a chain
        into an empty cache, where queries and keys line up one to one."""
        past, q = cache.length, len(tokens)
        self._reserve(cache, past + q)
        device = self.model.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.tensor([[past + d for d in node_depths(parents)]], device=device)
        mask, causal = self._mask(parents, past)
        hidden, earlier = self.run_layers(ids, positions, cache.keys, cache.values, past, mask, causal, hidden_layers)
        cache.length = past + q
        logits = self.model.lm_head(hidden)[0]
        if hidden_layers is None:
            return ForwardResult(logits, None)
        return ForwardResult(logits, torch.cat([hidden[0], *(earlier[i][0] for i in hidden_layers)], dim=-1))

    def run_layers(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                   values: list[torch.Tensor], past: int, mask: torch.Tensor | None, causal: bool = False,
                   hidden_layers: HiddenLayers = None,
                   real: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The decoder over `ids` (rows, q) at `positions` (rows, q): each layer writes its keys and values to slots
        past .. past + q of its buffers (rows, kv_heads, capacity, head_dim) and attends over slots 0 .. past + q
        under `mask` (rows or 1, 1, q, past + q; additive). The final-norm states (rows, q, hidden), and the states
        after i layers for i in `hidden_layers`.

        `real` (rows, q) bool marks the nodes that are not padding (batches, batch_cache.py): then everything but the
        attention runs on those nodes alone, packed, and the states come back packed, (nodes, hidden), in row-major
        order; padding nodes get zero keys and values."""
        q = ids.shape[1]
        end = past + q
        wide = few_wide_rows(real) if real is not None else None
        if real is not None:
            ids, positions = ids[real][None], positions[real][None]
        x = self.decoder.embed_tokens(ids)  # (1, nodes, hidden): one row, or the batch's real nodes packed
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        earlier = {}  # states after i layers, for hidden_layers
        for i, (layer, layer_keys, layer_values) in enumerate(zip(self.layers, keys, values, strict=True)):
            if hidden_layers and i in hidden_layers:
                earlier[i] = x
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            query = attention.q_proj(h).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            key = attention.k_proj(h).view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            value = attention.v_proj(h).view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
            if real is not None:  # to the (rows, heads, q, head_dim) layout attention reads, padding zeroed
                query, key, value = (unpack(t[0].transpose(0, 1), real).transpose(1, 2) for t in (query, key, value))
            layer_keys[:, :, past:end] = key
            layer_values[:, :, past:end] = value
            out = attend(query, layer_keys[:, :, :end], layer_values[:, :, :end], mask, causal, attention.scaling,
                         wide).transpose(1, 2)
            out = out.reshape(1, q, -1) if real is None else out[real].reshape(1, -1, self.heads * self.head_dim)
            x = x + attention.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.decoder.norm(x), earlier

    @staticmethod
    def _reserve(cache: StaticCache, entries: int) -> None:
        """Make room for `entries` entries, keeping the live ones (a long generation outgrew its first guess)."""
        if entries <= cache.capacity:
            return
        size = max(entries, 2 * cache.capacity)
        for buffers in (cache.keys, cache.values):
            for i, old in enumerate(buffers):
                grown = old.new_empty(old.shape[0], old.shape[1], size, old.shape[3])
                grown[:, :, :cache.length] = old[:, :, :cache.length]
                buffers[i] = grown
        cache.capacity = size

    @torch.inference_mode()  # buffers grown inside a forward are inference tensors
    def keep(self, cache: StaticCache, past_len: int, nodes: list[int]) -> None:
        if nodes != list(range(len(nodes))):
            index = torch.tensor(nodes, dtype=torch.long, device=cache.keys[0].device) + past_len
            for buffer in (*cache.keys, *cache.values):
                buffer[:, :, past_len:past_len + len(nodes)] = buffer.index_select(2, index)
        cache.length = past_len + len(nodes)

    def entries(self, cache: StaticCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :cache.length], v[:, :, :cache.length]) for k, v in zip(cache.keys, cache.values, strict=True)]

    def describe(self) -> dict:
        return {"backend": self.name, "kernels": linear_kernels_of(self.model)}
