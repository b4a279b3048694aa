"""The key/value cache of a batch of sequences, and the one forward that runs them together.

Layout: every layer keeps one buffer (rows, kv_heads, capacity, head_dim) for the whole batch, one row per sequence.
The first `slots` slots are in use, the same count for every row, and `live[row, slot]` says which of them hold that
row's entries: a row's live slots, in slot order, are its sequence's positions 0, 1, ... in order, with holes between
them. A forward writes every row's nodes at slots `slots .. slots + q` (rows with fewer nodes pad, and the padding
attends only to itself); `keep` then moves each row's accepted nodes to the front of that stretch and marks them live,
so the stretch shrinks to the longest accepted path and the shorter rows get holes. Buffers start zeroed, so every
slot holds finite numbers: a masked key must add exactly nothing, and garbage (a NaN) would poison the softmax.

Why holes rather than one packed row per sequence: positions are passed explicitly and the attention mask is built
from `live`, so a hole costs a masked key and nothing else, and a step touches only the new stretch, never the rows'
older entries (re-packing every row each step would copy the whole cache per step). When the holes outgrow the
entries, `reserve` packs every row to the left once. Sequences join as new rows (`merge`) and leave by dropping rows
(`select`): one copy of the cache per arrival or departure, not per step.

`BatchRunner` runs the forward: for the Llama family, the static backend's lean loop over these buffers
(backends/static.py: the same modules and arithmetic as HF, without its per-call dispatch); for any other architecture
hf.check_supported accepts, the model's own HF forward, on a transformers `Cache` whose layers write into these
buffers, with the 4D additive mask passed as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from ctcspec.backends.base import HiddenLayers, node_depths
from ctcspec.backends.hf import check_supported
from ctcspec.backends.static import StaticBackend, static_support_problem
from ctcspec.cpu_kernels import linear_kernels_of
from ctcspec.errors import CtcspecError


class SlotLayer(DynamicLayer):
    """One layer's buffers; a forward's new keys and values go to slots `used ..`, and the layer returns every used
    slot (the mask hides what a row may not see)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, used: int):
        super().__init__()
        self.keys, self.values, self.used = keys, values, used
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.used + key_states.shape[-2]
        self.keys[:, :, self.used:end] = key_states
        self.values[:, :, self.used:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.used

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.used + query_length, 0


@dataclass(frozen=True)
class RowResult:
    logits: torch.Tensor          # (nodes, vocab) of this row's nodes (last_only: of its last node, (1, vocab))
    hidden: torch.Tensor | None   # (nodes, hidden × (1 + layers)), as Backend.forward returns them


class BatchCache:
    """Keys and values of `rows` sequences of one model (see the module docstring for the layout)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], live: torch.Tensor, slots: int):
        self.keys, self.values, self.live, self.slots = keys, values, live, slots

    @classmethod
    @torch.inference_mode()  # every buffer is an inference tensor, written in place only here
    def empty(cls, model: torch.nn.Module, rows: int, capacity: int) -> BatchCache:
        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = model.get_input_embeddings().weight
        shape = (rows, config.num_key_value_heads, capacity, head_dim)
        layers = range(config.num_hidden_layers)
        return cls([param.new_zeros(shape) for _ in layers], [param.new_zeros(shape) for _ in layers],
                   torch.zeros(rows, capacity, dtype=torch.bool), 0)

    @property
    def rows(self) -> int:
        return self.live.shape[0]

    @property
    def capacity(self) -> int:
        return self.live.shape[1]

    def lengths(self) -> list[int]:
        """Entries each row holds."""
        return self.live.sum(dim=1).tolist()

    def entries(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A row's live (keys, values) per layer, each (1, kv_heads, length, head_dim): for checks, not speed."""
        index = self.live[row].nonzero()[:, 0].to(self.keys[0].device)
        return [(k[row:row + 1].index_select(2, index), v[row:row + 1].index_select(2, index))
                for k, v in zip(self.keys, self.values, strict=True)]

    @torch.inference_mode()
    def reserve(self, nodes: int) -> None:
        """Room for a forward of `nodes` nodes per row: pack the rows to the left when the holes have grown past the
        entries, and grow the buffers (doubling) when that is not enough."""
        lengths = self.lengths()
        longest = max(lengths, default=0)
        if self.slots + nodes > self.capacity or self.slots > 2 * longest + 64:
            if self.slots > longest:
                self._pack(longest)
        if self.slots + nodes > self.capacity:
            self._resize(max(self.slots + nodes, 2 * self.capacity))

    def _pack(self, longest: int) -> None:
        """Move every row's entries to slots 0 .. length - 1, in order."""
        order = torch.argsort((~self.live[:, :self.slots]).to(torch.int8), dim=1, stable=True)[:, :longest]
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                index = order.to(buffer.device)[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                buffer[:, :, :longest] = buffer[:, :, :self.slots].gather(2, index)
        lengths = torch.tensor(self.lengths())
        self.live.zero_()
        self.live[:, :longest] = torch.arange(longest)[None] < lengths[:, None]
        self.slots = longest

    def _resize(self, capacity: int) -> None:
        used = min(self.slots, capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :used] = old[:, :, :used]
                buffers[i] = new
        live = torch.zeros(self.rows, capacity, dtype=torch.bool)
        live[:, :used] = self.live[:, :used]
        self.live = live

    @torch.inference_mode()
    def keep(self, paths: list[list[int]]) -> None:
        """After a forward: keep each row's nodes `paths[row]` (indices into its nodes, in order), dropping the rest."""
        width = max(map(len, paths))
        index = torch.tensor([path + [0] * (width - len(path)) for path in paths], dtype=torch.long) + self.slots
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                gather = index.to(buffer.device)[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                buffer[:, :, self.slots:self.slots + width] = buffer.gather(2, gather)
        lengths = torch.tensor([len(path) for path in paths])
        self.live[:, self.slots:self.slots + width] = torch.arange(width)[None] < lengths[:, None]
        self.slots += width

    @torch.inference_mode()
    def select(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (sequences that finished leave)."""
        index = torch.tensor(rows, dtype=torch.long)
        for buffers in (self.keys, self.values):
            for i, buffer in enumerate(buffers):
                buffers[i] = buffer.index_select(0, index.to(buffer.device))
        self.live = self.live.index_select(0, index)

    @torch.inference_mode()
    def merge(self, other: BatchCache) -> None:
        """Append `other`'s rows after these (sequences joining); each row keeps its slots."""
        slots = max(self.slots, other.slots)
        capacity = max(self.capacity, other.capacity)
        if self.rows == 0:
            self.keys, self.values, self.live, self.slots = other.keys, other.values, other.live, other.slots
            return
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                new = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
                new[:a.shape[0], :, :self.slots] = a[:, :, :self.slots]
                new[a.shape[0]:, :, :other.slots] = b[:, :, :other.slots]
                mine[i] = new
        live = torch.zeros(self.rows + other.rows, capacity, dtype=torch.bool)
        live[:self.rows, :self.slots] = self.live[:, :self.slots]
        live[self.rows:, :other.slots] = other.live[:, :other.slots]
        self.live, self.slots = live, slots

    def hf_cache(self) -> Cache:
        """A transformers cache writing into these buffers at slot `slots`."""
        return Cache(layers=[SlotLayer(k, v, self.slots) for k, v in zip(self.keys, self.values, strict=True)])


def ancestors(parents: list[int]) -> np.ndarray:
    """(q, q) bool: node i may see node j (j is i or one of its ancestors)."""
    q = len(parents)
    seen = np.zeros((q, q), dtype=bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            seen[node] = seen[parent]
        seen[node, node] = True
    return seen


def batch_mask(live: torch.Tensor, parents: list[list[int]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (rows, 1, width, slots + width): each row's nodes see that row's live slots and their own
    ancestors; padding nodes see only themselves."""
    rows, slots = live.shape
    allowed = np.zeros((rows, width, slots + width), dtype=bool)
    allowed[:, :, :slots] = live.numpy()[:, None, :]
    for row, row_parents in enumerate(parents):
        q = len(row_parents)
        allowed[row, :q, slots:slots + q] = ancestors(row_parents)
        allowed[row, q:, :] = False
        allowed[row, range(q, width), range(slots + q, slots + width)] = True
    mask = torch.zeros(rows, 1, width, slots + width, dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(dtype).min)
    return mask


class BatchRunner:
    """Batched forwards of `model` over a BatchCache (see the module docstring for which forward runs)."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto"):
        check_supported(model)
        if backend not in ("auto", "static", "hf"):
            raise CtcspecError(f"batches run on the static or hf backend (or auto), not {backend!r}")
        self.model = model
        lean = backend == "static" or (backend == "auto" and static_support_problem(model) is None)
        self.lean = StaticBackend(model) if lean else None  # StaticBackend refuses, by name, what it cannot run
        self.name = "static" if self.lean else "hf"

    def describe(self) -> dict:
        """What shapes its speed, for reports and the cost-curve cache key."""
        return {"backend": f"batch-{self.name}", "kernels": linear_kernels_of(self.model)}

    @torch.inference_mode()
    def forward(self, cache: BatchCache, tokens: list[list[int]], parents: list[list[int]],
                hidden_layers: HiddenLayers = None, last_only: bool = False) -> list[RowResult]:
        """Run each row's nodes (`tokens[row]`, `parents[row]` as Backend.forward takes them) after that row's cached
        sequence, in one forward; their entries go to slots `cache.slots ..` (`cache.keep` settles which stay).
        `last_only` (a prefill): the logits of each row's last node alone (hidden states stay per node)."""
        width = max(map(len, tokens))
        cache.reserve(width)
        lengths = cache.lengths()
        device = self.model.device
        ids = torch.zeros(cache.rows, width, dtype=torch.long)
        positions = torch.zeros(cache.rows, width, dtype=torch.long)
        for row, (row_tokens, row_parents) in enumerate(zip(tokens, parents, strict=True)):
            q = len(row_tokens)
            ids[row, :q] = torch.tensor(row_tokens)
            positions[row, :q] = torch.tensor(node_depths(row_parents)) + lengths[row]
            positions[row, q:] = lengths[row]
        mask = batch_mask(cache.live[:, :cache.slots], parents, width, self.model.dtype).to(device)
        ids, positions = ids.to(device), positions.to(device)
        counts = [len(t) for t in tokens]
        if self.lean is not None:  # packed: padding costs attention only (static.StaticBackend.run_layers)
            real = torch.arange(width)[None] < torch.tensor(counts)[:, None]
            hidden, earlier = self.lean.run_layers(ids, positions, cache.keys, cache.values, cache.slots, mask,
                                                   hidden_layers=hidden_layers, real=real.to(device))
            states = [state[0] for state in (hidden, *(earlier[i] for i in hidden_layers or ()))]
            ends = torch.tensor(counts).cumsum(0)
            rows = [slice(end - count, end) for end, count in zip(ends.tolist(), counts, strict=True)]
            if last_only:  # the LM head over each row's last node alone
                logits = self.model.lm_head(hidden[0, ends - 1])
                row_logits = [logits[row:row + 1] for row in range(len(counts))]
            else:
                logits = self.model.lm_head(hidden)[0]
                row_logits = [logits[nodes] for nodes in rows]
        else:
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache.hf_cache(),
                             use_cache=True, output_hidden_states=hidden_layers is not None)
            layers = hidden_layers or ()
            states = [out.hidden_states[-1], *(out.hidden_states[i] for i in layers)] if out.hidden_states else []
            rows = [(row, slice(0, count)) for row, count in enumerate(counts)]
            row_logits = [out.logits[row, count - 1:count] if last_only else out.logits[row, :count]
                          for row, count in enumerate(counts)]
        results = []
        for nodes, logits in zip(rows, row_logits, strict=True):
            hidden = torch.cat([state[nodes] for state in states], dim=-1) if hidden_layers is not None else None
            results.append(RowResult(logits, hidden))
        return results
