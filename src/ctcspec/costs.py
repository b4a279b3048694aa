"""This machine's verification cost curve: time of one base forward over q tree nodes, relative to q = 1.

Verification is not free on a CPU (REFERENCE.md section 5), so tree sizes are chosen against a
curve measured here rather than a constant borrowed from a GPU paper.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache

from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree


@torch.inference_mode()
def verify_cost_curve(model: torch.nn.Module, sizes: list[int], context: int = 256, repeats: int = 5,
                      seed: int = 0) -> dict[int, float]:
    """Median seconds of one verification forward over q = size nodes (root included), per size.

    Sizes are measured interleaved, round by round, so drift of the machine spreads evenly.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    cache = DynamicCache(config=model.config)
    prefill(model, cache, prompt[:-1])  # the engine's invariant: the root is not cached yet
    timings: dict[int, list[float]] = {q: [] for q in sizes}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for q in sizes:
            tree = TokenTree.from_sequences([[int(t)] for t in torch.randint(0, vocab, (q - 1,), generator=gen)])
            start = time.perf_counter()
            verify_tree(model, cache, prompt[-1], tree, context - 1)
            timings[q].append(time.perf_counter() - start)
            cache.crop(-q)  # drop what the forward appended: back to the context alone
    return {q: statistics.median(ts[1:]) for q, ts in timings.items()}
