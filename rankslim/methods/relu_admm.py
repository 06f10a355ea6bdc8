"""ReLU-response low-rank + column-sparse approximation (the lecture's "Unified Framework", ADMM).

Per layer, :func:`rankslim.decompose.relu_admm.relu_admm` minimises
``||Y - r((A + B) X + b)||_F² + λ1 ||A||_{2,1} + λ2 ||B||_*`` on the calibration columns, where
``Y = r(W X + b)`` is the original layer's post-activation response.  The built layer computes
``(A + B) x + b`` exactly:

* ``B`` truncated to the knob rank ``r`` — plus the extra rank that the unused part of A's
  allowance pays for (see below), and never above B's own rank after singular value
  thresholding — as the low-rank branch;
* ``A`` restricted to at most ``a_columns`` columns (the largest column norms; the rest of A's
  non-zero columns are dropped and recorded) as the sparse branch of part A's
  :class:`~rankslim.layers.sparse.LowRankSparseLinear` / ``LowRankSparseConv2d`` (COO cost: value
  + index per non-zero).  When A ends up empty a plain low-rank layer is built.

Knob and budget: ``cost(target, r)`` = low-rank cost at rank ``r`` + the worst-case sparse branch
(``m · a_columns`` non-zeros), so it increases with ``r`` and is an upper bound of what is built;
the report's model totals are counted from the built modules and are exact.  When A keeps fewer
than the reserved columns, the saved ``m · (cap − used)`` MACs per position buy
``floor(m · (cap − used) / (m + k))`` extra ranks for B, so the built layer still fits ``cost(target, r)``.

Options (``compress(..., method_options={...})``):

* ``lam_rank`` (0.005): λ2 = lam_rank · t · σ1(W), so the SVT threshold in the B-step is
  ``lam_rank · σ1(W)``; ``t`` = 2 ||X||_F² / k (twice the mean eigenvalue of X Xᵀ, the data
  term's typical curvature);
* ``lam_sparse`` (0.1): λ1 = lam_sparse · t · max_i ||W[:, i]||, the column-shrinkage threshold;
* ``a_columns`` (0.05): maximum number of non-zero columns of A, as a fraction of the input
  dimension (float < 1) or an absolute count (int >= 1), never above :data:`MAX_A_COLUMNS` of
  the columns (what ``cost`` assumes); 0 disables A (λ1 = ∞);
* ``activation`` ("relu"): as for ``ddlr`` ("linear" for layers not followed by a ReLU);
* ``admm_max_iter`` (300), ``admm_tol`` (1e-5), ``mm_steps`` (3).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..cost import Cost
from ..decompose.relu_admm import relu_admm
from ..decompose.svd import truncated_svd
from ..errors import RankError, RankslimError
from ..layers.sparse import build_lowrank_sparse
from ..options import Opt, any_, float_, int_, optional
from ..surgery import Target
from .base import DecomposeContext, Method, register
from .common import activation_for, conv_reason, raw_columns
from .svd import build_lowrank, lowrank_cost


#: the largest fraction of input columns the sparse part A may keep; ``cost(target, r)`` counts
#: this many columns, so it is an upper bound of every layer the method builds
MAX_A_COLUMNS = 0.05


def a_column_cap(target: Target, option: Any) -> int:
    """Maximum non-zero columns of A for ``target`` from the ``a_columns`` option (fraction or count).

    Clipped to ``ceil(MAX_A_COLUMNS · k)``: the cost model cannot see method options, so a larger
    sparse part could break a params/MACs budget that the allocator already met.
    """
    k = target.matrix_shape[1]
    limit = min(k, int(math.ceil(MAX_A_COLUMNS * k)))
    value = MAX_A_COLUMNS if option is None else option
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RankslimError(f"a_columns must be a fraction in [0, 1) or a count >= 1, got {value!r}")
    if isinstance(value, float) and value < 1:
        return min(limit, int(math.ceil(value * k)))
    return min(limit, int(value))


@register
class ReluAdmmMethod(Method):
    """Low-rank B (+ column-sparse A) fitted to the ReLU response by ADMM."""

    name = "relu_admm"
    options = (Opt("lam_rank", float_, 0.005, "SVT threshold of the B-step is lam_rank * sigma_1(W)"),
               Opt("lam_sparse", float_, 0.1, "column-shrinkage threshold is lam_sparse * max column norm of W"),
               Opt("a_columns", optional(any_), None, "non-zero columns of A: fraction (<1) or count (default 0.05)"),
               Opt("activation", any_, None, "relu | linear | {glob: activation} (default relu)"),
               Opt("admm_max_iter", int_, 300, "ADMM iterations"),
               Opt("admm_tol", float_, 1e-5, "ADMM tolerance"),
               Opt("mm_steps", int_, 3, "majorize-minimize steps per ADMM iteration"))
    description = "low-rank + column-sparse fit of the ReLU response by ADMM (lecture's unified framework)"
    needs_data = True
    needs_raw = True

    def supports(self, target: Target) -> str | None:
        return conv_reason(target)

    def _sparse_cost(self, target: Target, cols: int) -> Cost:
        nnz = target.matrix_shape[0] * cols
        return Cost(2 * nnz, target.positions * nnz)

    def cost(self, target: Target, rank: int) -> Cost:
        # options are not visible here: count the largest sparse part decompose may build
        return lowrank_cost(target, rank) + self._sparse_cost(target, a_column_cap(target, None))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        opts = ctx.options
        if not 1 <= rank <= target.full_rank:
            raise RankError(f"rank {rank} is impossible for {target.name!r}: it must lie in [1, {target.full_rank}]")
        act = activation_for(target.name, opts.get("activation"))
        cap = a_column_cap(target, opts.get("a_columns"))
        X, Y_pre = raw_columns(target, ctx, "relu_admm")
        W = target.matrix.to(torch.float64).cpu()
        b = target.module.bias.detach().to(torch.float64).cpu() if target.has_bias else torch.zeros(W.shape[0],
                                                                                                  dtype=torch.float64)
        Z = Y_pre + b[:, None]
        Y = torch.relu(Z) if act == "relu" else Z
        t = 2.0 * float((X * X).sum()) / X.shape[0]  # the solver's default penalty (mean curvature)
        lam_rank = float(opts.get("lam_rank", 0.005)) * t * float(torch.linalg.matrix_norm(W, ord=2))
        col_max = float(torch.linalg.vector_norm(W, dim=0).max())
        lam_sparse = (float(opts.get("lam_sparse", 0.1)) * t * col_max) if cap > 0 else 1e300
        res = relu_admm(X, Y, b, lam_sparse, lam_rank, W0=W, t=t, activation=act,
                        max_iter=int(opts.get("admm_max_iter", 300)), tol=float(opts.get("admm_tol", 1e-5)),
                        mm_steps=int(opts.get("mm_steps", 3)))
        # A: keep at most `cap` non-zero columns, the largest in norm
        norms = torch.linalg.vector_norm(res.A, dim=0)
        nonzero = int((norms > 0).sum())
        keep = torch.topk(norms, min(cap, nonzero)).indices.sort().values if cap > 0 and nonzero > 0 else \
            torch.zeros(0, dtype=torch.int64)
        # B: the knob rank, plus the rank the unused part of the sparse allowance pays for (cost()
        # reserved `default cap` columns; m·(cols) MACs buy (m + k) MACs per rank, and params the same
        # at twice the rate, so the MAC count is the binding one), capped by B's own rank after SVT
        m, k = target.matrix_shape
        spare = m * (a_column_cap(target, None) - int(keep.numel())) // (m + k)
        r = max(1, min(rank + max(0, spare), target.full_rank, res.rank))
        f = truncated_svd(res.B, r, solver=ctx.solver, generator=ctx.generator)
        dtype = target.module.weight.dtype
        bias = target.module.bias.detach() if target.has_bias else None
        if keep.numel() > 0:
            A = torch.zeros_like(res.A)
            A[:, keep] = res.A[:, keep]
            mask = torch.zeros(A.shape, dtype=torch.bool)
            mask[:, keep] = True
            layer = build_lowrank_sparse(target.module, r).set_factors(f.U.to(dtype), f.V.to(dtype), A.to(dtype),
                                                                       mask, bias)
        else:
            layer = build_lowrank(target.module, r).set_factors(f.U.to(dtype), f.V.to(dtype), bias)
        info = {"rank": r, "knob": rank, "b_rank_admm": res.rank, "a_columns": int(keep.numel()),
                "a_columns_admm": nonzero, "a_column_cap": cap, "activation": act,
                "lam_rank": float(opts.get("lam_rank", 0.005)), "lam_sparse": float(opts.get("lam_sparse", 0.1)),
                "iterations": res.iterations, "converged": res.converged, "data_error": res.data_error,
                "seconds": round(res.seconds, 3), "calibration_columns": int(X.shape[1])}
        return layer, info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        r = int(info["rank"])
        if int(info.get("a_columns", 0)) > 0:
            return build_lowrank_sparse(module, r)
        return build_lowrank(module, r)


__all__ = ["ReluAdmmMethod", "a_column_cap", "MAX_A_COLUMNS"]
