"""Search-based rank allocation: Bayesian optimisation (LRPET section III-D) and AIMET-style greedy
per-layer sensitivity.

Both score candidate ranks with the user's ``eval_fn(model) -> float`` (higher is better) when the
context has one, else by *agreement*: the fraction of calibration inputs on which the truncated
model predicts the original model's class (a label-free accuracy proxy).  For the svd and spatial
methods candidates are scored on the masked-spectrum network (:class:`.masked.SpectralNet`: one SVD
per layer, no rebuild); other methods are rebuilt with ``context.build(ranks)``.

* ``bayes``: Optuna's TPE (seeded) over one keep-ratio ``p_l in [min_ratio, 1]`` per layer
  (rank ``ceil(p_l * max_rank)``), minimising LRPET eq. 11, ``error(p) + lambda * C(p)`` with
  ``C`` the kept fraction of the budgeted size (params; MACs when only MACs are budgeted; their
  mean when both are) and the error measured on a held-out part of the calibration batches.
  Infeasible trials are *projected*: all their ranks are scaled by the largest common factor that
  meets the budget (:func:`~rankslim.allocate.base.project_to_budget`) before scoring, so every
  evaluated candidate is feasible.  The first trial is the uniform ratio (every ``p_l = 1``,
  projected), so the search never returns worse than uniform scaling on its own objective.
  LRPET uses a Gaussian-process BO with expected improvement; we use Optuna's TPE.
* ``greedy-sensitivity`` (the AIMET greedy compression-ratio selection): compress one layer at a
  time to each candidate ratio and record the score drop; for a tolerance ``tau`` every layer
  takes its lowest ratio whose drop is ``<= tau`` (dense if none); bisection finds the smallest
  ``tau`` whose allocation meets the budget.  When even the lowest candidates do not fit, the
  allocation is projected onto the budget.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from ..errors import BudgetError
from .base import (Allocation, AllocationContext, Budget, CostTable, Ranks, budget_fractions,
                   project_to_budget)
from .masked import SpectralNet, reference_logits

Scorer = Callable[[Ranks], float]


def make_scorer(context: AllocationContext, batches: Sequence[torch.Tensor] | None = None,
                use_eval_fn: bool = True) -> tuple[Scorer, float, str]:
    """``(score(ranks), baseline score, kind)``: ``eval_fn`` of the built model when the context
    has one (and ``use_eval_fn``), else top-1 agreement with the original on ``batches``
    (default: all calibration batches).  Raises :class:`BudgetError` when neither is available."""
    if use_eval_fn and context.eval_fn is not None:
        if context.build is None:
            raise BudgetError("eval_fn scoring needs the context's build() function")
        return (lambda ranks: float(context.eval_fn(context.build(dict(ranks))))), \
            float(context.eval_fn(context.model)), "eval_fn"
    batches = list(context.batches if batches is None else batches)
    if not batches:
        raise BudgetError("search allocators need calibration data (data=...) or an eval_fn to score candidates")
    ref = torch.cat([z.argmax(1) for z in reference_logits(context.model, batches)])
    if all(m.maskable for m in context.methods.values()):
        net = SpectralNet(context.model, context.targets, context.methods)
        return (lambda ranks: float((net.predict(batches, ranks) == ref).float().mean())), 1.0, "agreement"
    if context.build is None:
        raise BudgetError("cannot score candidates: the allocation context has no build() function")

    def score(ranks: Ranks) -> float:
        cm = context.build(dict(ranks))
        pred = torch.cat([z.argmax(1) for z in reference_logits(cm, batches)])
        return float((pred == ref).float().mean())
    return score, 1.0, "agreement"


def _size(table: CostTable, budget: Budget, ranks: Ranks) -> float:
    fr = budget_fractions(table, ranks)
    qs = budget.quantities or ["params"]
    return sum(fr[q] for q in qs) / len(qs)


def bayes_allocate(table: CostTable, budget: Budget, *, context: AllocationContext, trials: int = 30,
                   lam: float = 1.0, min_ratio: float = 0.05, holdout: float = 0.5,
                   seed: int | None = None, use_eval_fn: bool = True) -> Allocation:
    """Bayesian (TPE) search of per-layer keep-ratios for LRPET eq. 11 under the budget.

    ``trials``: Optuna trials (the first is the projected uniform ratio); ``lam``: the trade-off
    ``lambda`` (LRPET uses 1); ``min_ratio``: smallest keep-ratio searched; ``holdout``: fraction
    of the calibration batches (the last ones) used to measure the error; ``seed``: sampler seed
    (default: the context's).  ``info`` holds the best objective, error and size, and the trial count.
    """
    import optuna

    if not budget.is_set():
        raise BudgetError("the bayes allocator needs a params and/or macs budget")
    if trials < 1:
        raise BudgetError(f"trials must be >= 1, got {trials}")
    if not 0.0 < min_ratio <= 1.0:
        raise BudgetError(f"min_ratio must lie in (0, 1], got {min_ratio}")
    table.require_feasible(budget)
    batches = list(context.batches)
    if batches:
        n_eval = min(len(batches), max(1, int(round(len(batches) * holdout))))
        batches = batches[len(batches) - n_eval:]
    score, base, kind = make_scorer(context, batches or None, use_eval_fn)
    t0 = time.perf_counter()

    def ranks_of(params: dict[str, float]) -> Ranks:
        raw = {lo.name: table.decide(lo, math.ceil(params[lo.name] * lo.max_rank)) for lo in table.layers}
        return project_to_budget(table, raw, budget)

    def objective(trial: "optuna.Trial") -> float:
        p = {lo.name: trial.suggest_float(lo.name, min_ratio, 1.0) for lo in table.layers}
        ranks = ranks_of(p)
        err = max(0.0, base - score(ranks)) if kind == "eval_fn" else 1.0 - score(ranks)
        size = _size(table, budget, ranks)
        trial.set_user_attr("ranks", ranks)
        trial.set_user_attr("error", err)
        trial.set_user_attr("size", size)
        return err + lam * size

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=int(context.seed if seed is None else seed))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.enqueue_trial({lo.name: 1.0 for lo in table.layers})
    study.optimize(objective, n_trials=int(trials))
    best = study.best_trial
    ranks = dict(best.user_attrs["ranks"])
    if not table.fits(ranks, budget):  # cannot happen: every trial was projected
        raise BudgetError("internal error: the best bayes trial breaks the budget; please report this")
    return Allocation(ranks, info={"objective": best.value, "error": best.user_attrs["error"],
                                   "size": best.user_attrs["size"], "trials": len(study.trials), "score": kind,
                                   "search_seconds": time.perf_counter() - t0,
                                   "uniform_objective": study.trials[0].value})


def greedy_sensitivity_allocate(table: CostTable, budget: Budget, *, context: AllocationContext,
                                candidates: Sequence[float] = (0.1, 0.25, 0.5, 0.75),
                                use_eval_fn: bool = True) -> Allocation:
    """AIMET-style greedy selection from per-layer sensitivities (see the module docstring).

    ``candidates``: keep-ratios tried per layer (rank ``ceil(c * max_rank)``).  ``info`` holds the
    sensitivity table ``{layer: {ratio: drop}}``, the chosen tolerance and whether a projection was
    needed.
    """
    if not budget.is_set():
        raise BudgetError("the greedy-sensitivity allocator needs a params and/or macs budget")
    cands = sorted({float(c) for c in candidates})
    if not cands or not all(0.0 < c <= 1.0 for c in cands):
        raise BudgetError(f"candidate ratios must lie in (0, 1], got {list(candidates)}")
    table.require_feasible(budget)
    score, base, kind = make_scorer(context, None, use_eval_fn)
    t0 = time.perf_counter()
    # per layer: [(ratio, rank, drop)] for the candidates that actually factorize the layer
    sens: dict[str, list[tuple[float, int, float]]] = {}
    for lo in table.layers:
        rows = []
        seen = set()
        for c in cands:
            r = table.decide(lo, math.ceil(c * lo.max_rank))
            if r is None or r in seen:
                continue
            seen.add(r)
            rows.append((c, r, base - score({lo.name: r})))
        sens[lo.name] = rows

    def alloc(tau: float) -> Ranks:
        out: Ranks = {}
        for lo in table.layers:
            ok = [r for _, r, d in sens[lo.name] if d <= tau]
            out[lo.name] = min(ok) if ok else None
        return out

    taus = sorted({d for rows in sens.values() for _, _, d in rows} | {0.0})
    lo_i, hi_i = 0, len(taus) - 1
    projected = False
    if not table.fits(alloc(taus[hi_i]), budget):
        ranks = project_to_budget(table, alloc(taus[hi_i]), budget)
        tau, projected = taus[hi_i], True
    else:
        while lo_i < hi_i:  # smallest tolerance whose allocation fits (cost falls as tau grows)
            mid = (lo_i + hi_i) // 2
            if table.fits(alloc(taus[mid]), budget):
                hi_i = mid
            else:
                lo_i = mid + 1
        tau = taus[lo_i]
        ranks = alloc(tau)
    return Allocation(ranks, info={"tolerance": tau, "projected": projected, "score": kind, "baseline": base,
                                   "sensitivity": {n: {f"{c:g}": d for c, _, d in rows} for n, rows in sens.items()},
                                   "search_seconds": time.perf_counter() - t0})


__all__ = ["bayes_allocate", "greedy_sensitivity_allocate", "make_scorer"]
