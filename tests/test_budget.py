"""Choosing the tree budget against a verification cost curve."""

from __future__ import annotations

import pytest
from ctc_helpers import tiny_ctc_drafter

from conftest import tiny_model
from ctcspec.drafters.hybrid import CTCLookupDrafter
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.pricing import BudgetPlan, PricedBudget, interpolate_cost
from ctcspec.tree import TokenTree


def test_interpolation_between_and_beyond_measured_sizes():
    cost = {1: 1.0, 4: 1.6, 8: 2.0}
    assert interpolate_cost(cost, 1) == 1.0
    assert interpolate_cost(cost, 6) == pytest.approx(1.8)
    assert interpolate_cost(cost, 12) == pytest.approx(2.4)


def test_budget_maximises_tokens_per_unit_time():
    acceptance = {1: 0.5, 4: 1.2, 8: 1.5, 16: 1.7}
    free = dict.fromkeys(acceptance, 0.0)
    flat = {1: 1.0, 64: 1.0}  # verification free: the largest tree wins
    assert BudgetPlan(acceptance, flat, free).best() == 16
    steep = {1: 1.0, 2: 1.5, 5: 1.6, 9: 2.6, 17: 5.0}
    assert BudgetPlan(acceptance, steep, free).best() == 4  # (1+1.2)/1.6 beats 1.5/1.5, 2.5/2.6, 2.7/5.0
    # a large drafting cost flattens the differences between budgets towards more accepted tokens
    moderate = {1: 1.0, 2: 1.2, 5: 1.5, 9: 1.8, 17: 2.4}
    assert BudgetPlan(acceptance, moderate, free).best() == 4
    assert BudgetPlan(acceptance, moderate, dict.fromkeys(acceptance, 100.0)).best() == 16
    # a drafter whose cost grows with the budget (sequential search) is pushed towards small trees
    assert BudgetPlan(acceptance, flat, {1: 0.0, 4: 0.1, 8: 5.0, 16: 10.0}).best() == 4


def test_merged_tree_prices_the_other_drafters_nodes():
    """ctc+lookup: lookup's copy is verified in the same forward, so CTC nodes must pay for themselves beside it."""
    acceptance = {2: 0.8, 4: 1.2, 8: 1.5}
    free = dict.fromkeys(acceptance, 0.0)
    steep = {1: 1.0, 2: 1.3, 4: 1.6, 8: 2.1, 16: 3.5}
    plan = BudgetPlan(acceptance, steep, free)
    assert plan.best_or_none() == 4                           # alone: (1 + 1.2) / 1.6 beats plain decoding
    assert plan.best_or_none(other_nodes=6, other_accept=2.5) == 0  # beside a copy expected to keep 2.5 of 6 nodes
    assert plan.best_or_none(scale=0.2) == 0                  # a generation where CTC drafts keep being rejected
    assert plan.rate(0) == pytest.approx(1.0)                 # drafting nothing: one plain forward per token
    flat = BudgetPlan(acceptance, {1: 1.0, 64: 1.0}, free)
    assert flat.best_or_none(other_nodes=6, other_accept=0.5) == 8  # nodes are free: CTC adds its largest tree
    assert flat.scale(accepted=0.0, expected=6.0, prior_steps=4.0) == pytest.approx(6.0 / 12.0)


class NoMatches(LookupDrafter):
    """Lookup that never finds a match: the priced budget then rests on the CTC part's own record."""

    def propose(self, request):
        return TokenTree()


def test_priced_ctc_lookup_stops_drafting_ctc_nodes_that_are_not_kept():
    """A random (untrained) CTC module is nearly never right: under a steep cost curve its budget drops to 0
    after a few steps (the held-out curve rescaled by what it kept), but for a probe every 8th step."""
    model = tiny_model("llama")
    plan = BudgetPlan({2: 0.8, 4: 1.2}, {1: 1.0, 3: 1.2, 5: 1.4, 16: 3.0}, {2: 0.0, 4: 0.0})
    hybrid = CTCLookupDrafter(tiny_ctc_drafter(model, seed=3, tree_budget=PricedBudget(plan, 4)), NoMatches())
    budgets = []
    draft = hybrid.ctc.draft

    def record(request, tree_budget):
        budgets.append(tree_budget)
        return draft(request, tree_budget)

    hybrid.ctc.draft = record
    result = SpeculativeEngine(model, hybrid).generate([5, 6, 7, 8, 9, 10, 11], 80)
    assert budgets[0] == 4                         # the held-out curve says CTC pays, at first
    late = budgets[len(budgets) // 2:]
    assert sum(b > 0 for b in late) <= len(late) // 8 + 1  # then only the probes draft
    assert result.stats.beta < 1.2                 # (it really was rejected)
