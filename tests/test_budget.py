"""Choosing the tree budget against a verification cost curve."""

from __future__ import annotations

import pytest

from ctcspec.budget import BudgetPlan, interpolate_cost


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
