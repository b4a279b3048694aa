"""What the tree budget is chosen from, measured on this machine.

Verification is not free on a CPU (REFERENCE.md section 5), so the budget is chosen (pricing.py) against this
machine's verification cost curve (time of one base forward over q tree nodes), measured once per model, backend,
device, dtype, kernels and thread count and cached under $CTCSPEC_HOME/costs, together with the drafter's held-out
acceptance curve and its own drafting time per budget: `budget_plan(drafter, backend)`.
Nothing here runs unless called: building a drafter never measures anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time

import torch

from ctcspec.backends import Backend
from ctcspec.batch_cache import BatchCache, BatchRunner
from ctcspec.drafters.base import BudgetedDrafter, DraftRequest
from ctcspec.home import ctcspec_home, write_cache_json
from ctcspec.native_linear import cpu_description, source_digest
from ctcspec.pricing import BudgetPlan
from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree

log = logging.getLogger(__name__)

COST_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
BATCH_WIDTHS = (1, 2, 4, 8, 16, 32)  # nodes per row (root included) of the batched cost curves


@torch.inference_mode()
def verify_cost_curve(backend: Backend, sizes: list[int], context: int = 256, repeats: int = 5,
                      seed: int = 0) -> dict[int, float]:
    """Median seconds of one verification forward over q = size nodes (root included), per size.

    Sizes are measured interleaved, round by round, so drift of the machine spreads evenly.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = backend.model.config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    cache = backend.new_cache(context + max(sizes))
    prefill(backend, cache, prompt[:-1])  # the engine's invariant: the root is not cached yet
    timings: dict[int, list[float]] = {q: [] for q in sizes}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for q in sizes:
            siblings = torch.randperm(vocab, generator=gen)[:q - 1]  # distinct, so the tree really has q - 1 nodes
            tree = TokenTree.from_sequences([[int(t)] for t in siblings])
            start = time.perf_counter()
            verify_tree(backend, cache, prompt[-1], tree)
            timings[q].append(time.perf_counter() - start)
            backend.keep(cache, context - 1, [])  # drop what the forward appended: back to the context alone
    return {q: statistics.median(ts[1:]) for q, ts in timings.items()}


@torch.inference_mode()
def batch_cost_curve(runner: BatchRunner, batches: list[int], widths: list[int], context: int = 256,
                     repeats: int = 3, seed: int = 0) -> dict[int, dict[int, float]]:
    """Median seconds of one batched verification forward (`runner.forward`) over `batch` rows of `width` nodes each
    (root included), after a `context`-token sequence per row: {batch: {width: seconds}}. Interleaved round by round,
    as `verify_cost_curve`."""
    gen = torch.Generator().manual_seed(seed)
    model = runner.model
    vocab = model.config.vocab_size
    caches = {}
    for batch in batches:
        caches[batch] = cache = BatchCache.empty(model, batch, context + max(widths))
        prompts = torch.randint(0, vocab, (batch, context - 1), generator=gen).tolist()
        runner.forward(cache, prompts, [list(range(-1, context - 2))] * batch, last_only=True)
        cache.keep([list(range(context - 1))] * batch)
    timings: dict[tuple[int, int], list[float]] = {(b, w): [] for b in batches for w in widths}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for batch, width in timings:
            nodes = [torch.randperm(vocab, generator=gen)[:width].tolist() for _ in range(batch)]
            start = time.perf_counter()
            runner.forward(caches[batch], nodes, [[-1] + [0] * (width - 1)] * batch)
            timings[batch, width].append(time.perf_counter() - start)
            caches[batch].keep([[]] * batch)
    return {b: {w: statistics.median(timings[b, w][1:]) for w in widths} for b in batches}


def cost_cache_path(backend: Backend | BatchRunner, sizes: tuple[int, ...], batches: tuple[int, ...] = ()):
    model = backend.model
    key = json.dumps({"config": model.config.to_json_string(), "device": str(model.device),
                      "dtype": str(model.dtype), **backend.describe(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_description(),
                      "native_source": source_digest(), "sizes": list(sizes),
                      **({"batches": list(batches)} if batches else {})}, sort_keys=True)
    return ctcspec_home() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def machine_cost_curve(backend: Backend, sizes: tuple[int, ...] = COST_SIZES) -> dict[int, float]:
    """`verify_cost_curve` for this model, backend, device, dtype, kernels and thread count: measured once (a
    few seconds), then read from $CTCSPEC_HOME/costs. The cache file is written whole or not at all."""
    path = cost_cache_path(backend, sizes)
    try:
        return {int(q): float(s) for q, s in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
    log.info("measuring this machine's verification cost curve once (a few seconds)")
    curve = verify_cost_curve(backend, list(sizes))
    write_cache_json(path, curve)
    return curve


MAX_MEASURED_BATCH = 16  # wider batches are priced by extrapolating (pricing.batch_share) from the two widest


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes whose costs are measured for batches of up to `max_batch`: 1, 2, 4, ... up to it and past,
    at most MAX_MEASURED_BATCH (the measurement keeps a cache per size; a distill batch of 96 would need gigabytes)."""
    sizes = [1, 2]
    while sizes[-1] < min(max_batch, MAX_MEASURED_BATCH):
        sizes.append(2 * sizes[-1])
    return tuple(sizes)


def machine_batch_cost(model: torch.nn.Module, max_batch: int, backend: str = "auto") -> dict[int, dict[int, float]]:
    """`batch_cost_curve` for batches of up to `max_batch` on this machine, with `backend`'s forward (as
    `machine_cost_curve`: measured once, some seconds, then read from $CTCSPEC_HOME/costs)."""
    batches = batch_sizes(max_batch)
    runner = BatchRunner(model, backend)
    path = cost_cache_path(runner, BATCH_WIDTHS, batches)
    try:
        saved = json.loads(path.read_text())
        return {int(b): {int(w): float(s) for w, s in curve.items()} for b, curve in saved.items()}
    except (OSError, ValueError, AttributeError):
        pass
    log.info("measuring this machine's batched verification cost once (some seconds)")
    curves = batch_cost_curve(runner, list(batches), list(BATCH_WIDTHS))
    write_cache_json(path, curves)
    return curves


def drafting_cost_curve(drafter: BudgetedDrafter, model: torch.nn.Module, budgets, context: int = 256,
                        repeats: int = 3) -> dict[int, float]:
    """Median seconds of one `drafter.draft` step per tree budget, on a random context (random hidden
    states of the width the drafter reads and random tokens). Leaves the drafter reset."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (context + repeats + 1,), generator=gen)
    width = model.config.hidden_size * (1 + len(drafter.feature_layers))
    hidden = torch.randn(context + repeats, width, generator=gen).to(model.dtype)
    seconds = {}
    for budget in budgets:
        drafter.reset()
        drafter.draft(DraftRequest(tokens[:context + 1], 16, new_hidden=hidden[:context]), budget)
        times = []
        for i in range(repeats):
            request = DraftRequest(tokens[:context + i + 2], 16, new_hidden=hidden[context + i:context + i + 1])
            start = time.perf_counter()
            drafter.draft(request, budget)
            times.append(time.perf_counter() - start)
        seconds[budget] = statistics.median(times)
    drafter.reset()
    return seconds


def budget_plan(drafter: BudgetedDrafter, backend: Backend,
                batch_cost: dict[int, dict[int, float]] | None = None) -> BudgetPlan | None:
    """Measure (or read the cached) costs a budget choice needs; None for drafters without an acceptance curve.
    With `batch_cost` (machine_batch_cost), the plan is for batches (batch.py), priced on batched forwards."""
    if not drafter.acceptance_curve:
        return None
    budgets = sorted(drafter.acceptance_curve)
    batch_cost = batch_cost or {}
    return BudgetPlan(dict(drafter.acceptance_curve), batch_cost.get(1) or machine_cost_curve(backend),
                      drafting_cost_curve(drafter, backend.model, budgets), batch_cost)
