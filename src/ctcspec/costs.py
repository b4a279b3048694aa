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
            siblings = torch.randperm(vocab, generator=gen)[:q - 1]  # distinct, so the tree really has q - 1 nodes
            tree = TokenTree.from_sequences([[int(t)] for t in siblings])
            start = time.perf_counter()
            verify_tree(model, cache, prompt[-1], tree, context - 1)
            timings[q].append(time.perf_counter() - start)
            cache.crop(-(len(tree) + 1))  # drop what the forward appended: back to the context alone
    return {q: statistics.median(ts[1:]) for q, ts in timings.items()}


COST_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def machine_cost_curve(model: torch.nn.Module, sizes: tuple[int, ...] = COST_SIZES) -> dict[int, float]:
    """`verify_cost_curve` for this model, device, dtype and thread count, measured once and cached
    under $CTCSPEC_HOME/costs (a few seconds the first time)."""
    import hashlib
    import json

    from ctcspec.cpu_kernels import linear_kernels_of
    from ctcspec.models import ctcspec_home

    key = json.dumps({"config": model.config.to_json_string(), "device": str(model.device),
                      "dtype": str(model.dtype), "kernels": linear_kernels_of(model),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "sizes": list(sizes)}, sort_keys=True)
    path = ctcspec_home() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return {int(q): float(s) for q, s in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
    import sys

    print("ctcspec: measuring this machine's verification cost curve once (a few seconds) ...", file=sys.stderr,
          flush=True)
    curve = verify_cost_curve(model, list(sizes), repeats=5)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curve))
    return curve


def interpolate_cost(cost: dict[int, float], q: int) -> float:
    """Cost of a q-node forward, linear between measured sizes and beyond the largest."""
    sizes = sorted(cost)
    if q <= sizes[0]:
        return cost[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        if q <= hi:
            return cost[lo] + (cost[hi] - cost[lo]) * (q - lo) / (hi - lo)
    lo, hi = sizes[-2], sizes[-1]
    return cost[hi] + (cost[hi] - cost[lo]) * (q - hi) / (hi - lo)


def choose_tree_budget(acceptance: dict[int, float], cost: dict[int, float],
                       draft_cost: float | dict[int, float] = 0.0) -> int:
    """The node budget b maximising expected tokens per unit time, (1 + accepted(b)) / (cost(1 + b) + draft).

    `acceptance` maps budgets to mean accepted draft tokens (measured on held-out data when the
    drafter was trained); `cost` is the verification cost curve (seconds per forward of q nodes);
    `draft_cost` is the drafting time per step, one number or one per budget (sequential drafters
    pay per node).
    """
    def draft(b: int) -> float:
        return draft_cost[b] if isinstance(draft_cost, dict) else draft_cost

    return max(acceptance, key=lambda b: expected_rate(acceptance[b], b, cost, draft(b)))


def expected_rate(accepted: float, budget: int, cost: dict[int, float], draft_cost: float = 0.0) -> float:
    """Expected tokens per second of a step drafting `budget` nodes of which `accepted` are kept on average."""
    return (1 + accepted) / (interpolate_cost(cost, budget + 1) + draft_cost)


def drafting_cost_curve(drafter, budgets, context: int = 256, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one `drafter.propose` step per tree budget, on a random context (hidden
    states and draft-vocabulary tokens); for trained drafters, whose cost may grow with the budget."""
    from ctcspec.drafters.base import DraftRequest

    module = drafter.module
    gen = torch.Generator().manual_seed(0)
    tokens = module.vocab_ids[torch.randint(0, len(module.vocab_ids), (context + repeats + 1,), generator=gen)]
    hidden = torch.randn(context + repeats, module.config.hidden_size, generator=gen).to(module.embed_weight.dtype)
    saved, seconds = drafter.tree_budget, {}
    for budget in budgets:
        drafter.tree_budget = budget
        drafter.reset()
        drafter.propose(DraftRequest(tokens[:context + 1], 16, hidden[:context]))
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            drafter.propose(DraftRequest(tokens[:context + i + 2], 16, hidden[context + i:context + i + 1]))
            times.append(time.perf_counter() - start)
        seconds[budget] = statistics.median(times)
    drafter.tree_budget = saved
    drafter.reset()
    return seconds
