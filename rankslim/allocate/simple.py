"""Allocators that need no search: fixed ratio, energy threshold, and CPTV budget bisection."""
from __future__ import annotations

import math

from ..errors import BudgetError
from .base import Budget, CostTable, Ranks, energy_ranks


def ratio_allocate(table: CostTable, budget: Budget, ratio: float) -> Ranks:
    """Rank ``ceil(ratio * full_rank)`` for every layer (``ratio`` in (0, 1]); the budget is ignored."""
    if not 0.0 < ratio <= 1.0:
        raise BudgetError(f"rank ratio must lie in (0, 1], got {ratio}")
    return {lo.name: table.decide(lo, math.ceil(ratio * lo.max_rank)) for lo in table.layers}


def energy_allocate(table: CostTable, budget: Budget, energy: float) -> Ranks:
    """Smallest rank per layer whose squared singular values reach ``energy`` of the total."""
    if not 0.0 < energy <= 1.0:
        raise BudgetError(f"energy threshold must lie in (0, 1], got {energy}")
    return energy_ranks(table, energy)


def cptv_allocate(table: CostTable, budget: Budget, iters: int = 60) -> Ranks:
    """CPTV (COBLA paper eq. 10): one shared energy threshold ``beta`` for all layers, found by
    bisection as the largest ``beta`` whose ranks meet every budget.

    Raises :class:`BudgetError` when no budget is set or it cannot be met.
    """
    if not budget.is_set():
        raise BudgetError("the cptv allocator needs a params and/or macs budget")
    table.require_feasible(budget)
    lo_b, hi_b = 0.0, 1.0
    best = table.cheapest()
    if table.fits(energy_ranks(table, 1.0), budget):
        return energy_ranks(table, 1.0)
    for _ in range(iters):
        mid = 0.5 * (lo_b + hi_b)
        ranks = energy_ranks(table, mid)
        if table.fits(ranks, budget):
            lo_b, best = mid, ranks
        else:
            hi_b = mid
    return best
