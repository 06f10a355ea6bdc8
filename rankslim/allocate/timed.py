"""The time-aware step of speed-aware allocation: at the same MAC budget and no larger approximation error, the
allocation whose layers, as measured, take the least time.

An error-minimising allocator (cptv by default) spreads a MAC budget over the layers by their spectra alone.
Measured on a CPU, a factorized layer's time is far from proportional to its MACs: near half rank a factorized
1×1 convolution can take 60-110% of the dense time, while at a small rank it takes 20-35% (see
``docs/results/speed_bound.md``).  So among the many allocations that meet the budget with about the same error,
some are much faster.  :func:`fastest_within_error` finds the fastest of those that are no worse than the
allocator's own choice in the error proxy, as a multiple-choice 0-1 program (:mod:`.choice`)::

    minimise    sum_i t_i(r_i)                          measured ms of layer i at rank r_i (dense: r_i = None)
    subject to  sum_i c_i^q(r_i) <= B_q - fixed_q       every budgeted quantity q (MACs, params)
                sum_i d_i(r_i)   <= (1 + slack) * D_ref  D_ref = sum_i d_i(reference_i)
                sum_i c_i^MAC(r_i) >= min(MACs of the reference, B_MAC - 0.01 * original MACs) - fixed_MAC
                d_i(r) = 1 - sum_{j<=r} sigma_ij^2 / sum_j sigma_ij^2   (relative residual energy, 0 when dense)

The candidates of layer i are dense, the ranks its timings sampled and the reference rank (so the reference is
feasible and the result is never predicted slower).  The floor (``fill``) keeps the MACs the budget grants
in use: the least time at the reference's error alone often keeps far fewer MACs than granted, and the floor
makes the program spend them where they cost the least time, which lowers the error further.  ``d_i`` is each
layer's relative squared approximation error (of its output on the calibration data for data-aware methods,
whose spectra are those of the problem solved);
summing it treats the layers' errors as adding up, which is the usual first-order reading, not a guarantee of
accuracy: benchmarks compare accuracy on trained models (``benchmarks/speed.py``).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..latency_cache import interpolate
from .base import Allocation, Budget, CostTable, Ranks
from .choice import ChoiceRow, solve_choice

#: absolute allowance on the error row for floating-point ties (the error proxy is a sum of fractions)
ERROR_TOL = 1e-9
#: the MAC floor: the result keeps at least the budget minus this fraction of the original's MACs (or the
#: allocator's MACs, when lower), so the MACs the user granted buy accuracy instead of being left unspent
FILL_GAP = 0.01


def residual_fractions(sigma: torch.Tensor, ranks: Sequence[int | None]) -> np.ndarray:
    """``1 - sum_{j<=r} sigma_j^2 / sum_j sigma_j^2`` for each ``r`` of ``ranks`` (``None``: dense, 0), for a
    descending spectrum ``sigma`` of shape ``(max_rank,)``; the squared spectrum is summed once."""
    cum = np.concatenate([[0.0], np.cumsum(np.square(sigma.double().cpu().numpy()))])
    total = float(cum[-1])
    if total <= 0:
        return np.zeros(len(ranks))
    return np.array([0.0 if r is None else max(0.0, 1.0 - float(cum[min(int(r), len(cum) - 1)]) / total)
                     for r in ranks])


def fastest_within_error(table: CostTable, reference: Mapping[str, int | None],
                         timings: Mapping[str, Mapping[str, Any]], budget: Budget, *, slack: float = 0.0,
                         fill: bool = True, min_gain: float = 0.0, time_limit: float = 30.0) -> Allocation:
    """The fastest allocation (by ``timings``) meeting ``budget`` whose error proxy is at most ``(1 + slack)``
    times ``reference``'s (module docstring).

    ``table``: the cost table the reference was allocated on (its ``decide`` rounds ranks and, in speed-aware
    mode, drops ranks not measurably faster); ``reference``: ``{layer: rank | None}``; ``timings``:
    ``{layer: {"dense": ms, "ranks": {rank: ms}}}`` (:func:`rankslim.latency_cache.measure_layer`), ms per batch;
    ``slack`` >= 0; ``fill``: keep at least the budget's MACs minus :data:`FILL_GAP` of the original's (or the
    reference's MACs when lower): without it the fastest allocation at the reference's error often keeps far fewer
    MACs than granted (41% of a 50% budget on ResNet-50), where the floor spends them on a smaller error.
    ``min_gain``: the result replaces the reference only when predicted at least this fraction faster (speed-aware
    mode passes its layer margin, 5%: a smaller predicted gain is within the noise of timings and not worth moving
    ranks for).  Returns the reference unchanged (``info["time_aware"] = "kept"``) when nothing faster is
    found; ``info`` holds both predicted times and errors.
    """
    t0 = time.perf_counter()
    names, options, times, errors, costs = [], [], [], [], {q: [] for q in budget.quantities}
    ref_time = ref_err = 0.0
    for lo in table.layers:
        m = timings[lo.name]
        measured = {int(k): float(v) for k, v in m["ranks"].items()}
        ref = reference.get(lo.name)
        cands: list[int | None] = [None]
        for r in sorted({*measured, *([ref] if ref is not None else [])}):
            d = table.decide(lo, r)
            if d is not None and d not in cands:
                cands.append(d)
        if ref is not None and ref not in cands:  # the reference's own rank, even if decide() would round it
            cands.append(ref)

        names.append(lo.name)
        options.append(cands)
        times.append(np.array([float(m["dense"]) if r is None else float(interpolate(measured, r)) for r in cands]))
        errors.append(residual_fractions(lo.sigma, cands))
        for q in costs:
            costs[q].append(np.array([float(table.layer_cost(lo, r).get(q)) for r in cands]))
        # the reference's rank is always among the candidates
        k = cands.index(ref)
        ref_time += float(times[-1][k])
        ref_err += float(errors[-1][k])
    cap = (1.0 + float(slack)) * ref_err + ERROR_TOL
    rows = [ChoiceRow(costs[q], upper=budget.limit(q, table.original) - table.fixed.get(q)) for q in costs]
    if fill and "macs" in costs:
        ref_macs = table.total(reference).macs
        floor = min(ref_macs, budget.limit("macs", table.original) - FILL_GAP * table.original.macs)
        rows.append(ChoiceRow(costs["macs"], lower=floor - table.fixed.macs))
    rows.append(ChoiceRow(errors, upper=cap))
    res = solve_choice(times, rows, time_limit=time_limit)
    info: dict[str, Any] = {"reference_ms": ref_time, "reference_error": ref_err, "slack": float(slack), "fill": fill,
                            "min_gain": float(min_gain),
                            "solver_seconds": round(time.perf_counter() - t0, 3), "milp_status": res.status}
    ranks: Ranks = dict(reference)
    if res.choice is not None:
        cand = {n: opts[k] for n, opts, k in zip(names, options, res.choice)}
        got_ms = sum(float(t[k]) for t, k in zip(times, res.choice))
        got_err = sum(float(e[k]) for e, k in zip(errors, res.choice))
        # re-check in the table's own units: HiGHS's tolerance is absolute on scaled rows
        info["solution_ms"] = got_ms
        if table.fits(cand, budget) and got_err <= cap and got_ms < (1.0 - min_gain) * ref_time:
            ranks = cand
            info.update(predicted_ms=got_ms, error=got_err, time_aware="fastest within error")
    if "time_aware" not in info:
        info.update(predicted_ms=ref_time, error=ref_err, time_aware="kept")
    return Allocation(ranks, info=info)


__all__ = ["ERROR_TOL", "FILL_GAP", "fastest_within_error", "residual_fractions"]
