"""Costs that are linear in COBLA's masking variables, and the per-layer candidate chains of the
spectrum-based allocators.

For the svd (COBLA eq. 4) and spatial (eq. 3) schemes a layer at rank ``r`` costs
``a + b * r`` in each quantity (``b``: what one more singular triplet costs, ``a``: the bias), so
``N_C(m)`` and ``N_M(m)`` are linear in the masks: ``sum_i (a_i + b_i * sum_j m_ij)``.
:func:`linear_costs` reads ``b = cost(r) - cost(r - 1)`` off each layer's ``cost_fn``, checks that
it does not depend on ``r`` and refuses the layers whose method is not affine in its knob.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetError
from .base import CostTable, LayerOption

QUANTITIES = ("params", "macs")


@dataclass
class LinearCosts:
    """``cost_q(layer i, rank r) = intercept[q][i] + slope[q][i] * r`` for q in ("params", "macs")."""

    intercept: dict[str, np.ndarray]
    slope: dict[str, np.ndarray]


def _probe_ranks(k: int) -> list[int]:
    return sorted({r for r in (1, 2, 3, k // 3, k // 2, k - 1, k) if 1 <= r <= k})


def linear_costs(table: CostTable, allocator: str) -> LinearCosts:
    """Intercepts and slopes of every layer's cost in its rank; raises :class:`BudgetError` naming
    the layer and method when a cost is not affine in the rank (such methods cannot be written as
    linear constraints on masks, so ``allocator`` cannot handle them)."""
    inter = {q: np.zeros(len(table.layers)) for q in QUANTITIES}
    slope = {q: np.zeros(len(table.layers)) for q in QUANTITIES}
    for i, lo in enumerate(table.layers):
        rs = _probe_ranks(lo.max_rank)
        costs = {r: lo.cost_fn(r) for r in rs}
        for q in QUANTITIES:
            c1 = costs[1].get(q)
            b = (costs[rs[1]].get(q) - c1) / (rs[1] - 1) if len(rs) > 1 else float(c1)
            for r in rs:
                pred = c1 + b * (r - 1)
                if not math.isclose(costs[r].get(q), pred, rel_tol=1e-9, abs_tol=0.5):
                    raise BudgetError(
                        f"the {allocator} allocator needs costs linear in the masks (COBLA eq. 8), but layer "
                        f"{lo.name!r} with method {lo.method!r} costs {costs[r].get(q):,} {q} at rank {r} where "
                        f"a straight line through ranks 1 and {rs[1]} gives {pred:,.0f}; use the svd or spatial "
                        "method for it, or a candidate-based allocator (pos-greedy, pos-cvx, bayes)")
            slope[q][i] = b
            inter[q][i] = c1 - b
    return LinearCosts(inter, slope)


@dataclass
class Chain:
    """The useful choices of one layer, cheapest last: ``ranks[c]`` (``None`` = dense),
    ``energy[c]`` (captured squared-spectrum energy, dense = all of it), ``costs[q][c]``."""

    option: LayerOption
    ranks: list
    energy: np.ndarray
    costs: dict[str, np.ndarray]


def layer_chain(table: CostTable, lo: LayerOption, max_candidates: int | None = None) -> Chain:
    """Dense, then every distinct decided rank from ``max_rank`` down to 1 (``round_to`` applied;
    ranks at which factorizing does not save are dropped: they cost as much as dense and keep less).

    ``max_candidates``: keep at most this many factorized ranks, evenly spread (the largest and
    smallest always kept); ``None`` keeps them all (exact).
    """
    s2 = lo.sigma.double().square().cpu().numpy()
    cum = np.concatenate([[0.0], np.cumsum(s2)])
    ranks: list = []
    seen = set()
    for r in range(lo.max_rank, 0, -1):
        d = table.decide(lo, r)
        if d is not None and d not in seen:
            seen.add(d)
            ranks.append(d)
    if max_candidates is not None and len(ranks) > max_candidates:
        idx = np.unique(np.round(np.linspace(0, len(ranks) - 1, max(2, max_candidates))).astype(int))
        ranks = [ranks[i] for i in idx]
    chain = [None] + ranks
    energy = np.array([cum[-1] if r is None else cum[min(r, len(s2))] for r in chain])
    costs = {q: np.array([float(table.layer_cost(lo, r).get(q)) for r in chain]) for q in QUANTITIES}
    return Chain(lo, chain, energy, costs)


def pos_objective(table: CostTable, ranks) -> float:
    """``sum_i log(sum_{j <= r_i} sigma_ij^2)`` (log of COBLA eq. 11/12's product); dense = all energy."""
    total = 0.0
    for lo in table.layers:
        s2 = lo.sigma.double().square()
        r = ranks.get(lo.name)
        e = float(s2.sum() if r is None else s2[: int(r)].sum())
        total += math.log(max(e, 1e-300))
    return total


__all__ = ["Chain", "LinearCosts", "QUANTITIES", "layer_chain", "linear_costs", "pos_objective"]
