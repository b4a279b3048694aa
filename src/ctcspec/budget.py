"""The tree budget: how many draft nodes a step should verify on this machine.

Verification is not free on a CPU (REFERENCE.md section 5), so the budget is chosen against this
machine's verification cost curve (time of one base forward over q tree nodes), measured once per
model, backend, device, dtype, kernels and thread count and cached under $CTCSPEC_HOME/costs,
together with the drafter's held-out acceptance curve and its own drafting time per budget:

    drafter.tree_budget = choose_tree_budget(drafter, backend)

`AdaptiveBudget` re-chooses the budget during each generation from the acceptance the engine reports.
Nothing here runs unless called: building a drafter never measures anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass

import torch

from ctcspec.backends import Backend
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.home import ctcspec_home, write_cache_json
from ctcspec.native_linear import cpu_description, source_digest
from ctcspec.tree import TokenTree
from ctcspec.verify import prefill, verify_tree

log = logging.getLogger(__name__)

COST_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


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


def cost_cache_path(backend: Backend, sizes: tuple[int, ...]):
    model = backend.model
    key = json.dumps({"config": model.config.to_json_string(), "device": str(model.device),
                      "dtype": str(model.dtype), **backend.describe(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_description(),
                      "native_source": source_digest(), "sizes": list(sizes)}, sort_keys=True)
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


def expected_rate(accepted: float, nodes: int, cost: dict[int, float], draft_cost: float = 0.0) -> float:
    """Expected tokens per second of a step verifying `nodes` draft nodes of which `accepted` are kept."""
    return (1 + accepted) / (interpolate_cost(cost, nodes + 1) + draft_cost)


def drafting_cost_curve(drafter: Drafter, model: torch.nn.Module, budgets, context: int = 256,
                        repeats: int = 3) -> dict[int, float]:
    """Median seconds of one `drafter.propose` step per tree budget, on a random context (random hidden
    states of the width the drafter reads and random tokens). Leaves the drafter's budget as it was."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (context + repeats + 1,), generator=gen)
    width = model.config.hidden_size * (1 + len(drafter.feature_layers))
    hidden = torch.randn(context + repeats, width, generator=gen).to(model.dtype)
    saved, seconds = drafter.tree_budget, {}
    for budget in budgets:
        drafter.tree_budget = budget
        drafter.reset()
        drafter.propose(DraftRequest(tokens[:context + 1], 16, new_hidden=hidden[:context]))
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            drafter.propose(DraftRequest(tokens[:context + i + 2], 16, new_hidden=hidden[context + i:context + i + 1]))
            times.append(time.perf_counter() - start)
        seconds[budget] = statistics.median(times)
    drafter.tree_budget = saved
    drafter.reset()
    return seconds


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget choice rests on: held-out acceptance, verification cost and drafting cost per budget."""
    acceptance: dict[int, float]
    cost: dict[int, float]
    draft_cost: dict[int, float]

    def rate(self, tree_budget: int, scale: float = 1.0, other_nodes: int = 0, other_accept: float = 0.0) -> float:
        """Expected tokens per second when this drafter drafts `tree_budget` nodes (0: none, nor any drafting time),
        its held-out acceptance scaled by `scale`. `other_nodes` nodes drafted by another drafter into the same tree
        (ctc+lookup's copies), expected to keep `other_accept`, are verified too; the step keeps the better draft."""
        accept = max(other_accept, scale * self.acceptance[tree_budget]) if tree_budget else other_accept
        draft = self.draft_cost[tree_budget] if tree_budget else 0.0
        return expected_rate(accept, other_nodes + tree_budget, self.cost, draft)

    def best(self, scale: float = 1.0) -> int:
        """The budget maximising expected tokens per unit time, (1 + accepted(b)) / (cost(1 + b) + draft(b))."""
        return max(self.acceptance, key=lambda b: self.rate(b, scale))

    def best_or_none(self, scale: float = 1.0, other_nodes: int = 0, other_accept: float = 0.0) -> int:
        """`best`, beside `other_nodes` nodes of another drafter's; 0 when drafting nothing is expected to be faster."""
        return max([0, *self.acceptance], key=lambda b: self.rate(b, scale, other_nodes, other_accept))

    def scale(self, accepted: float, expected: float, prior_steps: float) -> float:
        """How far a generation's acceptance runs from the held-out curve: (accepted so far) / (what the curve
        expected for the budgets used), with `prior_steps` steps' worth of the curve as a prior."""
        reference = max(self.acceptance.values())
        return (prior_steps * reference + accepted) / (prior_steps * reference + expected)


def budget_plan(drafter: Drafter, backend: Backend) -> BudgetPlan | None:
    """Measure (or read the cached) costs a budget choice needs; None for drafters without an acceptance curve."""
    if not drafter.acceptance_curve:
        return None
    budgets = sorted(drafter.acceptance_curve)
    return BudgetPlan(dict(drafter.acceptance_curve), machine_cost_curve(backend),
                      drafting_cost_curve(drafter, backend.model, budgets))


def choose_tree_budget(drafter: Drafter, backend: Backend, plan: BudgetPlan | None = None) -> int:
    """The tree budget maximising expected tokens per second for this drafter on this machine (from `plan`, else
    the one `budget_plan` makes); the drafter's own budget when it has no held-out acceptance curve (lookup, or
    a drafter saved without curves)."""
    plan = plan or budget_plan(drafter, backend)
    if plan is None:
        return drafter.tree_budget
    choice = plan.best()
    log.info("%s: tree budget %d (expected %.2f accepted draft tokens per step)", drafter.name, choice,
             plan.acceptance[choice])
    return choice


class AdaptiveBudget(Drafter):
    """Runs `drafter` with a tree budget re-chosen every step from the acceptance seen in this generation.

    The held-out acceptance curve is scaled by (accepted so far) / (what the curve expected for the
    budgets used), with `prior_steps` steps' worth of the curve as a prior; the budget maximising
    expected tokens per unit time under the scaled curve is taken, or none (0) when plain decoding is
    faster. While not drafting, every `probe_every`-th step still drafts (at the drafter's own budget),
    to keep measuring.
    """

    def __init__(self, drafter: Drafter, plan: BudgetPlan, prior_steps: float = 4.0, probe_every: int = 8):
        self.drafter, self.plan = drafter, plan
        self.prior_steps, self.probe_every = prior_steps, probe_every
        self.name, self.needs_hidden_states, self.drafts = drafter.name, drafter.needs_hidden_states, drafter.drafts
        self.feature_layers = drafter.feature_layers
        self.acceptance_curve = drafter.acceptance_curve
        self.probe_budget = drafter.tree_budget
        self.reset()

    def settings(self) -> dict:
        return {**self.drafter.settings(), "tree_budget": self.probe_budget, "adaptive_budget": True}

    def reset(self) -> None:
        self.drafter.reset()
        self._last_budget = 0          # budget of the previous proposal (0: it drafted nothing)
        self._accepted = 0.0           # accepted draft tokens so far in this generation
        self._expected = 0.0           # what the held-out curve expected for the budgets used
        self._idle_steps = 0

    def choose(self, accepted: float, expected: float) -> int:
        return self.plan.best_or_none(self.plan.scale(accepted, expected, self.prior_steps))

    def propose(self, request: DraftRequest) -> TokenTree:
        if self._last_budget:
            self._accepted += request.accepted
            self._expected += self.plan.acceptance.get(self._last_budget, 0.0)
        budget = self.choose(self._accepted, self._expected)
        self._idle_steps = 0 if budget else self._idle_steps + 1
        if not budget and self._idle_steps % self.probe_every == 0:
            budget = self.probe_budget
        self._last_budget = budget
        self.drafter.tree_budget = budget
        return self.drafter.propose(request)  # at budget 0 the drafter keeps the new context and drafts nothing
