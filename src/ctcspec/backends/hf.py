"""The reference backend: the HF model's own forward on a transformers `DynamicCache`.

Runs any decoder-only model transformers can load whose attention takes a 4D tree mask and whose
cache can be cut back to the accepted path; `check_supported` refuses the rest with a clear error.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ctcspec.backends.base import Backend, ForwardResult, HiddenLayers, node_depths
from ctcspec.cpu_kernels import linear_kernels_of
from ctcspec.errors import CtcspecError
from ctcspec.tree import is_chain

COMPACTABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # cache layers `compact_cache` can cut to a path
MASKED_ATTENTION = ("eager", "sdpa")  # attention implementations that read an additive 4D float mask


def check_supported(model: torch.nn.Module) -> None:
    """Refuse, with a clear error, a model whose verification could not be exact: a cache with layers that
    cannot be compacted to the accepted path (linear-attention or recurrent state, indexed caches), chunked
    attention, or an attention implementation that ignores a 4D tree mask."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in MASKED_ATTENTION:
        raise CtcspecError(f"attention implementation {attention!r} cannot take a tree attention mask; "
                           f"load the model with attn_implementation one of {', '.join(MASKED_ATTENTION)}")
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
    if "chunked_attention" in layer_types:
        raise CtcspecError("models with chunked attention are not supported: the engine's tree mask assumes "
                           "full or sliding-window attention")
    for layer in DynamicCache(config=model.config).layers:
        if type(layer) not in COMPACTABLE_LAYERS:
            raise CtcspecError(f"this model's cache has {type(layer).__name__} layers (linear attention, recurrent "
                               "state or an indexed cache), which speculative decoding cannot roll back to the "
                               "accepted path; it is not supported")


def tree_attention_mask(parents: list[int], past_len: int, dtype: torch.dtype,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4D mask (1, 1, q, past_len + q): 0 where a node may attend, the dtype's minimum elsewhere.

    Additive float rather than boolean: transformers' eager attention misreads boolean 4D masks.
    """
    q = len(parents)
    allowed = torch.zeros(q, past_len + q, dtype=torch.bool)
    allowed[:, :past_len] = True
    for node, parent in enumerate(parents):
        if parent >= 0:
            allowed[node, past_len:] = allowed[parent, past_len:]
        allowed[node, past_len + node] = True
    mask = torch.zeros(q, past_len + q, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.to(device)[None, None]


def compact_cache(cache: DynamicCache, past_len: int, path: list[int]) -> None:
    """Keep the context plus the chosen nodes' keys/values, in path order, in every layer.

    The layers get new tensors (a view when the path is a contiguous prefix of the nodes);
    nothing is written in place.
    """
    contiguous = path == list(range(len(path)))
    index = None if contiguous else torch.tensor(path, dtype=torch.long) + past_len
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if getattr(layer, "is_sliding", False) and layer.cumulative_length != layer.keys.shape[-2]:
            raise RuntimeError("a sliding-window layer dropped keys; the engine must stay inside the window")
        if contiguous:
            layer.keys = layer.keys[:, :, : past_len + len(path)]
            layer.values = layer.values[:, :, : past_len + len(path)]
        else:
            idx = index.to(layer.keys.device)
            layer.keys = torch.cat([layer.keys[:, :, :past_len], layer.keys.index_select(2, idx)], dim=2)
            layer.values = torch.cat([layer.values[:, :, :past_len], layer.values.index_select(2, idx)], dim=2)
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = layer.keys.shape[-2]


class HFBackend(Backend):
    """The model's own HF forward; works for every architecture `check_supported` accepts."""

    name = "hf"

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        super().__init__(model)

    def new_cache(self, capacity: int) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def length(self, cache: DynamicCache) -> int:
        return cache.get_seq_length()

    def context_limit(self, max_context: int) -> tuple[int, str]:
        """Sliding-window layers must never drop a key the tree might need."""
        layers = DynamicCache(config=self.model.config).layers
        windows = [layer.sliding_window for layer in layers if getattr(layer, "is_sliding", False)]
        if windows and min(windows) - 1 < max_context:
            return min(windows) - 1, f"the model's sliding window of {min(windows)} tokens holds {min(windows) - 1}"
        return super().context_limit(max_context)

    @torch.inference_mode()
    def forward(self, cache: DynamicCache, tokens: list[int], parents: list[int],
                hidden_layers: HiddenLayers = None) -> ForwardResult:
        device, past_len = self.model.device, cache.get_seq_length()
        input_ids = torch.tensor([tokens], device=device)
        position_ids = torch.tensor([[past_len + d for d in node_depths(parents)]], device=device)
        # A chain is plain causal decoding: let the model build its usual mask.
        mask = None if is_chain(parents) else tree_attention_mask(parents, past_len, self.model.dtype, device)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=cache,
                         use_cache=True, output_hidden_states=hidden_layers is not None)
        if hidden_layers is None:
            return ForwardResult(out.logits[0], None)
        states = [out.hidden_states[-1][0], *(out.hidden_states[i][0] for i in hidden_layers)]
        return ForwardResult(out.logits[0], torch.cat(states, dim=-1))

    def keep(self, cache: DynamicCache, past_len: int, nodes: list[int]) -> None:
        compact_cache(cache, past_len, nodes)

    def entries(self, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def describe(self) -> dict:
        return {"backend": self.name, "kernels": linear_kernels_of(self.model)}
