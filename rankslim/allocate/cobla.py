"""COBLA: Constrained Optimization Based Low-rank Approximation (Li & Shi, ECCV 2018, section 3).

Masks ``m_ij`` switch singular triplet ``j`` of layer ``i`` (eqs. 3-4, :mod:`.masked`).  The
costs are linear in the masks (:func:`.linear.linear_costs`), so the 0-1 program of eq. 7 is
relaxed to eq. 8,

    minimise E(m)   s.t.   N_C(m) <= N_C,max,  N_M(m) <= N_M,max,  0 <= m_ij <= 1,

and solved by sequential quadratic programming (:func:`sqp_relaxation`, SciPy's SLSQP with the
linear constraints and their exact Jacobian; the gradient of ``E`` comes from autograd).  Then:

* randomized rounding (eq. 9): ``r_i = floor(sum_j m_hat_ij)`` plus one with probability equal to
  the fractional part, repeated until the ranks meet every budget (:func:`randomized_round`);
* ``S_sigma,i`` = the ``r_i`` largest ``m_hat_ij * sigma_ij``; the kept ``P_j`` are scaled by
  ``m_hat_ij``.  rankslim's plan stores one rank per layer, so these scales travel in
  :class:`~rankslim.allocate.base.Allocation` ``.scales`` and
  :func:`~rankslim.allocate.masked.apply_allocation_weights` turns them into the weight that the
  svd/spatial method then truncates exactly.

Where we differ from the paper (also in docs/allocation.md):

* ``E`` without labels: the mean KL divergence from the original model's softmax to the masked
  model's, on the calibration batches (the paper uses the training loss with labels);
  ``loss="weights"`` is a data-free stand-in, the mean relative squared Frobenius error
  ``sum_j sigma_ij^2 (1 - m_ij)^2 / sum_j sigma_ij^2`` over layers;
* SciPy's SLSQP (dense BFGS, monotone line search) instead of MOSEK-based SQP with a
  non-monotone line search; sub-sampled gradients are obtained by restarting SLSQP on a fresh
  random subset of batches (``rounds`` x ``batches_per_eval``), so each SLSQP run sees one
  deterministic function;
* very wide models: consecutive singular values may share one mask variable (``max_vars``), which
  keeps SLSQP's dense ``O(n^2)`` QP tractable (ResNet-50 has ~2.6e4 singular values);
* each layer keeps at least one singular value (``sum_j m_ij >= 1``): rankslim layers have rank >= 1;
* the paper does not say where SQP starts; we start from the 0/1 masks of the CPTV ranks
  (``start="cptv"``).  A uniform start ``m = t`` shrinks every weight; on ResNet-20 (BatchNorm with
  fixed running statistics) that network predicts one class and SLSQP, with 20 iterations, stayed
  there (KL loss 2.08 before and after) — see docs/allocation.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BudgetError
from .base import Allocation, AllocationContext, Budget, CostTable, Ranks, project_to_budget
from .linear import linear_costs
from .masked import SpectralNet, prefix_mask, reference_logits, require_maskable

LossGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass
class SQPResult:
    """Outcome of :func:`sqp_relaxation`: the relaxed solution ``x``, its loss ``fun``, SLSQP's
    iteration / evaluation counts, ``success`` and ``message``, and wall ``seconds``."""

    x: np.ndarray
    fun: float
    nit: int
    nfev: int
    success: bool
    message: str
    seconds: float
    history: list[float] = field(default_factory=list)


def sqp_relaxation(fun: LossGrad, A_ub: np.ndarray, b_ub: np.ndarray, x0: np.ndarray,
                   lb: float | np.ndarray = 0.0, ub: float | np.ndarray = 1.0, maxiter: int = 50,
                   ftol: float = 1e-10) -> SQPResult:
    """Minimise ``fun(x)`` s.t. ``A_ub @ x <= b_ub`` and ``lb <= x <= ub`` by SQP (SciPy SLSQP).

    ``fun(x) -> (value, gradient)`` with ``x: (n,)`` float64; ``A_ub: (c, n)``, ``b_ub: (c,)``.
    A pure function of its arguments (no model, no data), so it can be tested on losses with a
    known optimum.  Returns the best point SLSQP reached (the last iterate, clipped to the bounds).
    """
    from scipy.optimize import Bounds, minimize

    A = np.asarray(A_ub, dtype=np.float64)
    b = np.asarray(b_ub, dtype=np.float64)
    x0 = np.asarray(x0, dtype=np.float64)
    n = x0.size
    if A.ndim != 2 or A.shape[1] != n or b.shape != (A.shape[0],):
        raise ValueError(f"A_ub must be (c, {n}) and b_ub (c,), got {A.shape} and {b.shape}")
    history: list[float] = []

    def f(x):
        v, g = fun(x)
        history.append(float(v))
        return float(v), np.asarray(g, dtype=np.float64)

    cons = [{"type": "ineq", "fun": lambda x: b - A @ x, "jac": lambda x: -A}]
    t0 = time.perf_counter()
    res = minimize(f, x0, jac=True, method="SLSQP", bounds=Bounds(lb, ub), constraints=cons,
                   options={"maxiter": int(maxiter), "ftol": ftol})
    lo = np.broadcast_to(np.asarray(lb, dtype=np.float64), (n,))
    hi = np.broadcast_to(np.asarray(ub, dtype=np.float64), (n,))
    x = np.clip(res.x, lo, hi)
    return SQPResult(x, float(res.fun), int(res.nit), int(res.nfev), bool(res.success), str(res.message),
                     time.perf_counter() - t0, history)


def mask_groups(ks: list[int], max_vars: int | None) -> tuple[list[torch.Tensor], int]:
    """Map singular value ``j`` of layer ``i`` to a variable index.  All variables are separate
    when ``sum(ks) <= max_vars`` (or ``max_vars`` is None); otherwise layer ``i`` gets
    ``max(1, floor(k_i * max_vars / sum(ks)))`` variables over consecutive singular values.
    Returns the per-layer index tensors (lengths ``ks``) and the number of variables."""
    total = sum(ks)
    idx, off = [], 0
    for k in ks:
        g = k if (max_vars is None or total <= max_vars) else max(1, min(k, int(k * max_vars // total)))
        idx.append(off + torch.div(torch.arange(k) * g, k, rounding_mode="floor"))
        off += g
    return idx, off


def randomized_round(s: np.ndarray, table: CostTable, budget: Budget,
                     generator: torch.Generator, max_tries: int = 1000) -> tuple[Ranks, int, str]:
    """COBLA eq. 9 repeated until the budget holds.

    ``s``: relaxed rank ``sum_j m_hat_ij`` per layer (table order).  Each try draws
    ``r_i = floor(s_i) + Bernoulli(s_i - floor(s_i))`` (at least 1, at most ``max_rank``) and keeps
    the first feasible draw.  Should all ``max_tries`` draws break the budget (rounding up to
    ``round_to`` or a dense fallback can), the floors are tried, then those ranks projected onto
    the budget (:func:`project_to_budget`), so the result always fits a feasible budget.
    Returns ``(ranks, tries, how)`` with ``how`` in ("random", "floor", "projected").
    """
    table.require_feasible(budget)
    s = np.asarray(s, dtype=np.float64)
    fl = np.floor(s)
    frac = s - fl
    ks = np.array([lo.max_rank for lo in table.layers])

    def decide(r: np.ndarray) -> Ranks:
        r = np.clip(r, 1, ks).astype(int)
        return {lo.name: table.decide(lo, int(ri)) for lo, ri in zip(table.layers, r)}

    for t in range(1, max_tries + 1):
        u = torch.rand(len(s), generator=generator, dtype=torch.float64).numpy()
        ranks = decide(fl + (u < frac))
        if table.fits(ranks, budget):
            return ranks, t, "random"
    ranks = decide(fl)
    if table.fits(ranks, budget):
        return ranks, max_tries, "floor"
    return project_to_budget(table, ranks, budget), max_tries, "projected"


def _kl_loss(net: SpectralNet, batches, ref_logp, names, order_idx):
    """``x -> (E(x), dE/dx)``: mean KL(original || masked) over ``batches`` (autograd)."""
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        total_n = sum(b.shape[0] for b in batches)
        val = 0.0
        for xb, lp in zip(batches, ref_logp):  # one graph per batch keeps memory at one batch
            scales = {n: xt[idx] for n, idx in zip(names, order_idx)}
            z = net.forward(xb, scales)
            loss = F.kl_div(F.log_softmax(z, dim=1), lp, log_target=True, reduction="sum") / total_n
            loss.backward()
            val += float(loss.detach())
        return val, xt.grad.double().numpy()
    return fun


def _weights_loss(sigmas: list[torch.Tensor], order_idx, n_vars: int):
    """``x -> (E(x), grad)``: mean over layers of ``sum_j s_j^2 (1 - m_j)^2 / sum_j s_j^2`` (data-free)."""
    w = torch.zeros(n_vars, dtype=torch.float64)
    for s, idx in zip(sigmas, order_idx):
        s2 = s.double().square()
        w.index_add_(0, idx, s2 / s2.sum().clamp_min(1e-300) / len(sigmas))
    wn = w.numpy()

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        d = 1.0 - x
        return float(np.sum(wn * d * d)), -2.0 * wn * d
    return fun


def cobla_allocate(table: CostTable, budget: Budget, *, context: AllocationContext, maxiter: int = 50,
                   loss: str = "auto", max_vars: int | None = 2000, rounds: int = 1,
                   batches_per_eval: int | None = None, max_tries: int = 1000, scale: bool = True,
                   rounding_candidates: int = 1, start: str = "cptv", seed: int | None = None) -> Allocation:
    """COBLA rank allocation (see the module docstring for the algorithm and our deviations).

    ``maxiter``: SLSQP iterations in total (split over ``rounds``); ``loss``: "kl" (needs
    calibration batches), "weights" (data-free) or "auto" (kl when batches exist);
    ``max_vars``: cap on mask variables; ``batches_per_eval``: calibration batches per SLSQP round
    (``None``: all); ``max_tries``: randomized rounding attempts; ``scale``: return the ``m_hat``
    singular-value scales (COBLA's second step); ``rounding_candidates``: number of feasible
    randomized roundings drawn, keeping the one with the lowest loss on all calibration batches
    (1 = the paper: the first feasible draw; an extension, kl loss only); ``start``: the SQP's
    initial point, "cptv" (0/1 masks of the CPTV ranks, default) or "uniform" (one common mask
    value meeting the budget: shrinks every weight, which BatchNorm networks do not survive);
    ``seed``: rounding/sub-sampling seed (default:
    the context's).  Returns an :class:`Allocation` whose ``info`` records the solver time
    (``sqp_seconds``), iterations, relaxed and rounded losses and rounding attempts.
    """
    if not budget.is_set():
        raise BudgetError("the cobla allocator needs a params and/or macs budget")
    table.require_feasible(budget)
    require_maskable(context.methods, "cobla")
    lin = linear_costs(table, "cobla")
    gen = torch.Generator().manual_seed(int(context.seed if seed is None else seed))
    names = [lo.name for lo in table.layers]
    ks = [lo.max_rank for lo in table.layers]
    order_idx, n = mask_groups(ks, max_vars)
    sizes = np.zeros(n)
    for idx in order_idx:
        np.add.at(sizes, idx.numpy(), 1.0)

    # linear constraints A x <= b: the budgets, then sum_j m_ij >= 1 per layer
    rows, rhs = [], []
    for q in budget.quantities:
        a = np.zeros(n)
        for i, idx in enumerate(order_idx):
            np.add.at(a, idx.numpy(), lin.slope[q][i])
        lim = budget.limit(q, table.original) - table.fixed.get(q) - float(lin.intercept[q].sum())
        sc = max(abs(lim), 1.0)
        rows.append(a / sc), rhs.append(lim / sc)
    for idx in order_idx:
        a = np.zeros(n)
        np.add.at(a, idx.numpy(), -1.0)
        rows.append(a), rhs.append(-1.0)
    A, b = np.array(rows), np.array(rhs)
    if start == "cptv":
        # 0/1 prefix masks of the CPTV ranks (eq. 10): a feasible, working network to start from
        # (dense layers start whole; SLSQP's first QP step repairs the linear constraints if needed)
        from .simple import cptv_allocate
        start_ranks = cptv_allocate(table, budget)
        x0 = np.zeros(n)
        for lo, idx in zip(table.layers, order_idx):
            r = start_ranks[lo.name]
            m = prefix_mask(lo.max_rank, r).double()
            np.add.at(x0, idx.numpy(), m.numpy())
        x0 /= np.maximum(sizes, 1.0)  # grouped variables: the mean mask of their singular values
    elif start == "uniform":
        # the largest common mask value meeting the budget rows
        nb = len(budget.quantities)
        t = min([1.0] + [b[j] / max(A[j].sum(), 1e-300) for j in range(nb)])
        x0 = np.full(n, max(t, 0.0))
        for idx, k in zip(order_idx, ks):  # each layer at least rank 1
            x0[idx.numpy()] = np.maximum(x0[idx.numpy()], 1.0 / k)
    else:
        raise BudgetError(f"cobla start must be 'cptv' or 'uniform', got {start!r}")

    kind = loss if loss != "auto" else ("kl" if context.batches else "weights")
    if kind not in ("kl", "weights"):
        raise BudgetError(f"cobla loss must be 'kl', 'weights' or 'auto', got {loss!r}")
    if kind == "kl" and not context.batches:
        raise BudgetError("cobla with loss='kl' needs calibration data: pass data=... to compress (or loss='weights')")
    t_start = time.perf_counter()
    net = None
    if kind == "kl":
        net = SpectralNet(context.model, context.targets, context.methods)
        by = net.by_name
        for lo in table.layers:  # the table's spectrum and ours must describe the same masks
            if by[lo.name].k != lo.max_rank:
                raise BudgetError(f"layer {lo.name!r}: {by[lo.name].k} singular values but max_rank {lo.max_rank}")
        ref = [F.log_softmax(z, dim=1) for z in reference_logits(context.model, context.batches)]
    setup_s = time.perf_counter() - t_start

    rounds = max(1, int(rounds))
    x, res, nit, nfev, sqp_s, hist = x0, None, 0, 0, 0.0, []
    for rnd in range(rounds):
        if kind == "kl":
            if batches_per_eval is not None and batches_per_eval < len(context.batches):
                pick = torch.randperm(len(context.batches), generator=gen)[:batches_per_eval].tolist()
            else:
                pick = list(range(len(context.batches)))
            fun = _kl_loss(net, [context.batches[i] for i in pick], [ref[i] for i in pick], names, order_idx)
        else:
            fun = _weights_loss([lo.sigma for lo in table.layers], order_idx, n)
        it = max(1, maxiter // rounds + (1 if rnd < maxiter % rounds else 0))
        res = sqp_relaxation(fun, A, b, x, maxiter=it)
        x, nit, nfev, sqp_s = res.x, nit + res.nit, nfev + res.nfev, sqp_s + res.seconds
        hist += res.history

    m_hat = [torch.from_numpy(x)[idx] for idx in order_idx]  # per singular value, table order
    s_relaxed = np.array([float(m.sum()) for m in m_hat])

    def kept_scales(ranks: Ranks) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(scales to return, masks to evaluate): S_sigma,i = the r_i largest m_hat * sigma."""
        out, ev = {}, {}
        for lo, m in zip(table.layers, m_hat):
            r = ranks[lo.name]
            if r is None:
                continue
            if not scale:
                ev[lo.name] = prefix_mask(lo.max_rank, r)
                continue
            keep = torch.argsort(m * lo.sigma.double().cpu(), descending=True)[:r]
            sc = torch.zeros(lo.max_rank, dtype=torch.float64)
            sc[keep] = m[keep].clamp_min(1e-12)  # a kept triplet must stay in the rank-r factorization
            out[lo.name] = ev[lo.name] = sc
        return out, ev

    def full_loss(ev: dict[str, torch.Tensor]) -> float:
        tot = sum(xb.shape[0] for xb in context.batches)
        val = 0.0
        with torch.no_grad():
            for xb, lp in zip(context.batches, ref):
                z = net.forward(xb, {k_: v.float() for k_, v in ev.items()})
                val += float(F.kl_div(F.log_softmax(z, 1), lp, log_target=True, reduction="sum")) / tot
        return val

    best = None
    losses = []
    for _ in range(max(1, int(rounding_candidates))):
        ranks, tries, how = randomized_round(s_relaxed, table, budget, gen, max_tries)
        scales, ev = kept_scales(ranks)
        val = full_loss(ev) if net is not None else math.nan
        losses.append(val)
        if best is None or (net is not None and val < best[0]):
            best = (val, ranks, scales, tries, how)
    val, final, scales, tries, how = best
    info = {"loss": kind, "variables": n, "singular_values": int(sum(ks)), "sqp_seconds": sqp_s,
            "setup_seconds": setup_s, "sqp_iterations": nit, "sqp_evaluations": nfev,
            "sqp_message": res.message if res else "", "loss_start": hist[0] if hist else math.nan,
            "loss_relaxed": res.fun if res else math.nan, "relaxed_ranks": dict(zip(names, s_relaxed.tolist())),
            "rounding": how, "rounding_tries": tries, "scaled": bool(scale), "rounding_candidates": len(losses)}
    if net is not None:  # the loss of the rounded (and scaled) solution, for the record
        info["loss_rounded"] = val
        info["loss_rounded_candidates"] = losses
    return Allocation(final, scales=scales, info=info)


__all__ = ["SQPResult", "cobla_allocate", "mask_groups", "randomized_round", "sqp_relaxation"]
