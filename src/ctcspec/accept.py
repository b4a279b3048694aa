"""Acceptance: the longest root-to-node path the base model agrees with, and KV-cache compaction."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Acceptance:
    path: list[int]       # verification nodes kept, root (0) first
    tokens: list[int]     # new tokens: the accepted draft tokens, then the base model's next token


def accept_longest_path(node_tokens: list[int], parents: list[int], greedy: list[int]) -> Acceptance:
    """Walk from the root, moving to the child whose token equals the base model's greedy choice.

    Draft trees are deduplicated, so at most one child can match at each step.
    """
    children: dict[tuple[int, int], int] = {}
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[(parent, node_tokens[node])] = node
    path = [0]
    while (child := children.get((path[-1], greedy[path[-1]]))) is not None:
        path.append(child)
    tokens = [node_tokens[n] for n in path[1:]] + [greedy[path[-1]]]
    return Acceptance(path, tokens)


def compact_cache(cache, past_len: int, path: list[int]) -> None:
    """Keep the context plus the accepted nodes' keys/values, in path order, in every layer.

    The layers get new tensors (a view when the path is a contiguous prefix of the nodes);
    nothing is written in place.
    """
    contiguous = path == list(range(len(path)))
    index = None if contiguous else torch.tensor(path) + past_len
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
