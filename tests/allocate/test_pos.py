"""POS-Greedy and POS-CVX (COBLA eqs. 11-12) on random spectra."""
from __future__ import annotations

import pytest

from rankslim.allocate import Budget, pos_cvx_allocate, pos_greedy_allocate
from rankslim.allocate.linear import pos_objective
from rankslim.errors import BudgetError

from ._tables import random_table


@pytest.mark.parametrize("seed", range(12))
def test_cvx_objective_at_least_greedy(seed):
    table = random_table(seed, layers=4 + seed % 3, round_to=1 + seed % 2)
    eta = [0.3, 0.5, 0.7][seed % 3]
    for budget in (Budget(macs=eta), Budget(params=eta, macs=eta)):
        g = pos_greedy_allocate(table, budget)
        c = pos_cvx_allocate(table, budget)
        assert table.fits(g, budget) and table.fits(c, budget)
        assert c.info["optimal"]
        # exact 0-1 optimum of eq. 12 >= greedy's feasible point
        assert pos_objective(table, c) >= pos_objective(table, g) - 1e-9
        assert c.info["objective"] == pytest.approx(pos_objective(table, c))


def test_cvx_beats_greedy_somewhere():
    gaps = []
    for seed in range(12):
        table = random_table(seed, layers=6)
        b = Budget(params=0.4, macs=0.4)
        gaps.append(pos_objective(table, pos_cvx_allocate(table, b)) - pos_objective(table, pos_greedy_allocate(table, b)))
    assert max(gaps) > 1e-6  # the greedy is not always optimal (else the comparison would be vacuous)


def test_infeasible_budget_refused_with_reason():
    table = random_table(0)
    for fn in (pos_greedy_allocate, pos_cvx_allocate):
        with pytest.raises(BudgetError, match="smallest reachable"):
            fn(table, Budget(params=0.01, macs=0.01))
        with pytest.raises(BudgetError, match="needs a params and/or macs budget"):
            fn(table, Budget())


def test_loose_budget_keeps_everything_dense():
    table = random_table(1)
    for fn in (pos_greedy_allocate, pos_cvx_allocate):
        ranks = fn(table, Budget(params=1.0, macs=1.0))
        assert all(r is None for r in ranks.values())
