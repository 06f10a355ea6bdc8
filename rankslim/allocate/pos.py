"""Product-of-sums rank allocation (COBLA paper section 4, eqs. 11-12).

Both allocators maximise ``prod_i sum_{j <= r_i} sigma_ij^2`` (the captured squared-spectrum
energy of every layer, multiplied) under the budget:

* ``pos-greedy`` — Zhang et al. (CVPR 2015 / TPAMI 2016, section "rank selection for whole-model
  acceleration"): start with every layer whole and repeatedly drop the last kept singular value
  of the layer with the smallest *relative energy loss per unit of cost saved*,
  ``(sigma_{i,r}^2 / sum_{j<=r} sigma_ij^2) / delta_cost_i``, until the budget holds.  The greedy
  measures cost in one quantity only (``constraint``; by default MACs when a MAC budget is set,
  as in the paper, else parameters); when a budget on the other quantity is also set and still
  broken once the first holds, it goes on with the same measure in that quantity until it holds.
* ``pos-cvx`` — eq. 12 solved exactly as a 0-1 program: one binary ``z_ic`` per candidate rank
  ``c`` of layer ``i`` (dense included), ``sum_c z_ic = 1``, maximise
  ``sum_ic z_ic log(E_i(c))`` (the log of the product, which is what a piecewise-linear reading
  of eq. 12 over candidate ranks gives) subject to both budgets, with SciPy's ``milp`` (HiGHS).
  Tabulating the candidates makes it exact for any cost model, affine or not.
"""
from __future__ import annotations

import heapq
import time

import numpy as np

from ..errors import BudgetError
from .base import Allocation, Budget, CostTable, Ranks
from .linear import Chain, layer_chain, pos_objective


def _need_budget(budget: Budget, name: str) -> None:
    if not budget.is_set():
        raise BudgetError(f"the {name} allocator needs a params and/or macs budget")


def pos_greedy_allocate(table: CostTable, budget: Budget, constraint: str | None = None) -> Allocation:
    """Zhang et al.'s greedy on COBLA eq. 11 (see the module docstring).

    ``constraint``: the cost quantity of the greedy measure ("macs" or "params"; default: "macs"
    when a MAC budget is set, else "params").  Returns an :class:`Allocation` whose ``info`` holds
    the objective (sum of logs) and the number of greedy steps.
    """
    _need_budget(budget, "pos-greedy")
    q = constraint or ("macs" if budget.macs is not None else "params")
    if q not in ("params", "macs"):
        raise BudgetError(f"constraint must be 'params' or 'macs', got {q!r}")
    table.require_feasible(budget)
    chains = [layer_chain(table, lo) for lo in table.layers]
    pos = [0] * len(chains)  # index into each chain: 0 = dense
    limits = {k: budget.limit(k, table.original) for k in budget.quantities}
    total = {k: float(table.fixed.get(k)) + sum(float(c.costs[k][0]) for c in chains) for k in ("params", "macs")}

    def measure(i: int, k: str) -> float | None:
        c, p = chains[i], pos[i]
        if p + 1 >= len(c.ranks):
            return None
        saved = c.costs[k][p] - c.costs[k][p + 1]
        rel_loss = (c.energy[p] - c.energy[p + 1]) / max(c.energy[p], 1e-300)
        if saved <= 0:  # no saving in the measured quantity: only worth it as a last resort
            return float("inf")
        return rel_loss / saved

    def violated() -> list[str]:
        return [k for k in limits if total[k] > limits[k]]

    steps = 0
    heap: list = []
    current = None
    while violated():
        bad = violated()
        k = q if q in bad else bad[0]  # the paper's single constraint first, then whatever still breaks
        if k != current:
            current = k
            heap = [(m, i) for i in range(len(chains)) if (m := measure(i, k)) is not None]
            heapq.heapify(heap)
        if not heap:
            raise BudgetError("pos-greedy reached every layer's smallest rank without meeting the budget")
        _, i = heapq.heappop(heap)
        c, p = chains[i], pos[i]
        for kk in total:
            total[kk] += c.costs[kk][p + 1] - c.costs[kk][p]
        pos[i] = p + 1
        steps += 1
        m = measure(i, current)
        if m is not None:
            heapq.heappush(heap, (m, i))
    ranks: Ranks = {c.option.name: c.ranks[p] for c, p in zip(chains, pos)}
    return Allocation(ranks, info={"objective": pos_objective(table, ranks), "steps": steps, "constraint": q})


def pos_cvx_allocate(table: CostTable, budget: Budget, max_candidates: int | None = None,
                     time_limit: float = 120.0, mip_rel_gap: float = 0.0) -> Allocation:
    """COBLA eq. 12 as an exact multiple-choice 0-1 program solved by HiGHS (``scipy.optimize.milp``).

    ``max_candidates``: per-layer cap on candidate ranks (evenly spread; ``None``: all, exact);
    ``time_limit`` (seconds) and ``mip_rel_gap`` are passed to HiGHS.  Raises
    :class:`BudgetError` when the budget is infeasible or HiGHS finds no solution in time.
    """
    from .choice import ChoiceRow, solve_choice

    _need_budget(budget, "pos-cvx")
    table.require_feasible(budget)
    t0 = time.perf_counter()
    chains: list[Chain] = [layer_chain(table, lo, max_candidates) for lo in table.layers]
    n = sum(len(c.ranks) for c in chains)
    rows = [ChoiceRow([c.costs[q] for c in chains], upper=budget.limit(q, table.original) - table.fixed.get(q))
            for q in budget.quantities]
    res = solve_choice([-np.log(np.maximum(c.energy, 1e-300)) for c in chains], rows, time_limit=time_limit,
                       mip_rel_gap=mip_rel_gap)
    if res.choice is None:
        raise BudgetError(f"pos-cvx: HiGHS found no solution ({res.message}); raise time_limit or the budget")
    ranks: Ranks = {c.option.name: c.ranks[k] for c, k in zip(chains, res.choice)}
    if not table.fits(ranks, budget):  # HiGHS feasibility tolerance on a scaled row: tighten by one step
        from .base import project_to_budget
        ranks = project_to_budget(table, ranks, budget)
    return Allocation(ranks, info={"objective": pos_objective(table, ranks), "milp_status": res.status,
                                   "milp_message": res.message, "variables": n,
                                   "solver_seconds": time.perf_counter() - t0,
                                   "optimal": bool(res.status == 0)})


__all__ = ["pos_cvx_allocate", "pos_greedy_allocate"]
