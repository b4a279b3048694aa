"""The tree budget rule: how many draft nodes a step should verify, from measured curves.

A step that verifies b draft nodes, of which a are kept, yields 1 + a tokens for one base forward over 1 + b
nodes plus the drafting: (1 + a) / (cost(1 + b) + draft(b)) tokens per second. `BudgetPlan` holds the three
curves (held-out acceptance, this machine's verification cost, the drafter's drafting time, per budget;
`budget.py` measures them) and picks the budget that maximises that rate.

In a batch of B sequences (batch.py) one forward verifies every sequence's 1 + b nodes, padded to the widest row, and
costs C_B(1 + b) (measured per batch size and row width). Each sequence is charged its share, C_B(1 + b) / B, so
maximising each sequence's own rate (1 + a) / (C_B(1 + b) / B + draft(b)) maximises the batch's accepted tokens per
second (its goodput, B (1 + a) / (C_B(1 + b) + B draft(b))) when the sequences draft alike. A forward over more rows
costs more per added node once the matrix products stop being bound by reading the weights, so speculation shrinks as
the batch grows, and stops (budget 0) where plain decoding of the whole batch is expected to be faster.

A trained drafter asks its `BudgetPolicy` for the budget of every step:
- `FixedBudget`: the same budget every step;
- `PricedBudget`: re-chosen every step from the plan, its acceptance scaled by what this generation has kept so
  far, beside the nodes another drafter puts into the same tree (ctc+lookup's copies); 0 (no draft) when plain
  decoding is expected to be faster, with a probe step every `probe_every` idle steps to keep measuring.

This module only computes; nothing here measures or mutates a drafter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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


def batch_share(batch_cost: dict[int, dict[int, float]], batch: int) -> dict[int, float]:
    """One sequence's share of a forward over `batch` sequences, per row width: C_batch(width) / batch, linear in the
    batch size between the measured sizes (at least two) and beyond the largest."""
    widths = sorted(set.intersection(*(set(curve) for curve in batch_cost.values())))
    return {w: interpolate_cost({size: curve[w] for size, curve in batch_cost.items()}, batch) / batch for w in widths}


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget choice rests on: held-out acceptance, verification cost and drafting cost per budget, and, for
    batches, the cost of a batched forward per batch size and row width (empty: the drafter runs one sequence)."""
    acceptance: dict[int, float]
    cost: dict[int, float]
    draft_cost: dict[int, float]
    batch_cost: dict[int, dict[int, float]] = field(default_factory=dict)
    _shares: dict[int, dict[int, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def verify_cost(self, batch: int = 1) -> dict[int, float]:
        """A sequence's verification cost per node count: its share of a batched forward of `batch` sequences when the
        plan is for batches, else `cost`."""
        if not self.batch_cost:
            return self.cost
        if batch not in self._shares:  # a memo of a pure function of the plan
            self._shares[batch] = batch_share(self.batch_cost, batch)
        return self._shares[batch]

    def rate(self, tree_budget: int, scale: float = 1.0, other_nodes: int = 0, other_accept: float = 0.0,
             batch: int = 1) -> float:
        """Expected tokens per second when this drafter drafts `tree_budget` nodes (0: none, nor any drafting time),
        its held-out acceptance scaled by `scale`. `other_nodes` nodes drafted by another drafter into the same tree
        (ctc+lookup's copies), expected to keep `other_accept`, are verified too; the step keeps the better draft.
        In a batch of `batch` sequences, the rate of this sequence for its share of the forward."""
        accept = max(other_accept, scale * self.acceptance[tree_budget]) if tree_budget else other_accept
        draft = self.draft_cost[tree_budget] if tree_budget else 0.0
        return expected_rate(accept, other_nodes + tree_budget, self.verify_cost(batch), draft)

    def best(self, scale: float = 1.0, batch: int = 1) -> int:
        """The budget maximising expected tokens per unit time, (1 + accepted(b)) / (cost(1 + b) + draft(b))."""
        return max(self.acceptance, key=lambda b: self.rate(b, scale, batch=batch))

    def best_or_none(self, scale: float = 1.0, other_nodes: int = 0, other_accept: float = 0.0,
                     batch: int = 1) -> int:
        """`best`, beside `other_nodes` nodes of another drafter's; 0 when drafting nothing is expected to be faster."""
        return max([0, *self.acceptance], key=lambda b: self.rate(b, scale, other_nodes, other_accept, batch))

    def scale(self, accepted: float, expected: float, prior_steps: float) -> float:
        """How far a generation's acceptance runs from the held-out curve: (accepted so far) / (what the curve
        expected for the budgets used), with `prior_steps` steps' worth of the curve as a prior."""
        reference = max(self.acceptance.values())
        return (prior_steps * reference + accepted) / (prior_steps * reference + expected)


class BudgetPolicy(ABC):
    """The tree budget of each step of one generation. `next` is called once per step, before drafting, with how
    many of the previous step's draft nodes (of this drafter's own) the base model kept, and how many sequences the
    step's forward verifies together (1: decoding alone)."""

    def reset(self) -> None:  # noqa: B027 - optional hook, a fixed budget keeps no per-generation state
        """Forget the generation so far; called before every generation."""

    @abstractmethod
    def next(self, kept: int, other_nodes: int = 0, other_accept: float = 0.0, batch: int = 1) -> int:
        """This step's budget; `other_nodes` nodes of another drafter's, expected to keep `other_accept`, share the
        tree; `batch` sequences share the forward."""

    @abstractmethod
    def settings(self) -> dict:
        """How the budget is set, for reports."""


@dataclass
class FixedBudget(BudgetPolicy):
    """The same `tree_budget` every step."""
    tree_budget: int

    def next(self, kept: int, other_nodes: int = 0, other_accept: float = 0.0, batch: int = 1) -> int:
        return self.tree_budget

    def settings(self) -> dict:
        return {"tree_budget": self.tree_budget}


class PricedBudget(BudgetPolicy):
    """The budget maximising expected tokens per second under `plan`, re-chosen every step.

    The held-out acceptance curve is scaled by (kept so far) / (what the curve expected for the budgets used), with
    `prior_steps` steps' worth of the curve as a prior. While the choice is 0 (no draft), every `probe_every`-th
    step drafts anyway, at `probe` (None: the plan's best at the current scale), to keep measuring; in a batch of B
    sequences every (B × `probe_every`)-th, so that the batch as a whole probes as often as one sequence alone.
    `start`: the budget chosen before the first step, reported by `settings` (`adaptive`: reported as the probe
    budget of --adaptive-budget)."""

    probe_every_default = 8

    def __init__(self, plan: BudgetPlan, start: int, probe: int | None = None, prior_steps: float = 4.0,
                 probe_every: int = probe_every_default):
        self.plan, self.start, self.probe = plan, start, probe
        self.prior_steps, self.probe_every = prior_steps, probe_every
        self.reset()

    def reset(self) -> None:
        self._last = 0            # budget of the previous step (0: it drafted nothing)
        self._kept = 0.0          # draft tokens kept so far in this generation
        self._expected = 0.0      # what the held-out curve expected for the budgets used
        self._idle_steps = 0

    def choose(self, kept: float, expected: float, other_nodes: int = 0, other_accept: float = 0.0,
               batch: int = 1) -> int:
        """The budget after `kept` draft tokens were kept where the curve expected `expected` (0: none)."""
        scale = self.plan.scale(kept, expected, self.prior_steps)
        return self.plan.best_or_none(scale, other_nodes, other_accept, batch)

    def next(self, kept: int, other_nodes: int = 0, other_accept: float = 0.0, batch: int = 1) -> int:
        if self._last:
            self._kept += kept
            self._expected += self.plan.acceptance.get(self._last, 0.0)
        budget = self.choose(self._kept, self._expected, other_nodes, other_accept, batch)
        self._idle_steps = 0 if budget else self._idle_steps + 1
        if not budget and self._idle_steps % (self.probe_every * batch) == 0:  # a batch probes as one sequence
            scale = self.plan.scale(self._kept, self._expected, self.prior_steps)
            budget = self.probe if self.probe is not None else self.plan.best(scale, batch)
        self._last = budget
        return budget

    def settings(self) -> dict:
        if self.probe is not None:
            return {"tree_budget": self.probe, "adaptive_budget": True}
        return {"tree_budget": self.start, "priced": True}
