"""DDLR (Papadimitriou & Jain): data-driven low rank with a ReLU-aware output constraint.

Per layer, problem (4) of the paper (see :mod:`rankslim.decompose.ddlr`) is solved on the
calibration columns ``X: (k, n)`` and the original pre-bias outputs ``Y = W X``, and the solution
``Û`` is truncated to a low-rank layer (:class:`~rankslim.layers.lowrank.LowRankLinear`, or
:class:`~rankslim.layers.lowrank.LowRankConv2d` through the im2col view for convs).

How the budget and ``eps`` interact: the knob ``r`` (the allocator's rank) is the rank of the
built layer, so ``cost(target, r)`` is the plain low-rank cost and DDLR competes under the same
params/MACs budgets as SVD.  ``eps`` (relative, ``eps_l = eps * ||X||_F`` as in the paper) shapes
``Û``: a larger ``eps`` concentrates its spectrum (lower nuclear norm), so truncating it at ``r``
loses less, at the price of a looser fit.  ``rank_rule="elbow"`` gives the paper's behaviour:
the rank is the elbow of ``Û``'s singular values, capped at ``r`` (use ``ratio=1.0`` to leave the
elbow alone: the knob is then full rank and only ``eps`` decides).

Options (``compress(..., method_options={...})``):

* ``eps`` (0.05): relative tolerance ``c`` of ``eps_l = c · ||Y_{l-1}||_F``;
* ``rank_rule`` ("knob"): "knob" builds rank ``r``; "elbow" builds ``min(r, elbow(Û))``;
* ``activation`` ("relu"): "relu" for layers followed by a ReLU (the paper's masked constraint),
  "linear" for others (plain ``||U X - Y||_F <= eps``), or a ``{glob: activation}`` mapping over
  layer names (unmatched layers use "relu");
* ``ddlr_solver`` ("auto"): "cvxpy" (SCS, small layers), "admm" (ours) or "auto" by size;
* ``ddlr_max_iter`` / ``ddlr_tol``: passed to the solver.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cost import Cost
from ..decompose.ddlr import DDLR_SOLVERS, ddlr, elbow_rank
from ..decompose.svd import truncated_svd
from ..errors import RankError, RankslimError
from ..options import Opt, any_, float_, int_, one_of, optional
from ..surgery import Target
from .common import activation_for, conv_reason, raw_columns
from .base import DecomposeContext, Method, register
from .svd import build_lowrank, lowrank_cost

RANK_RULES = ("knob", "elbow")











@register
class DDLRMethod(Method):
    """Problem (4) of the DDLR paper, truncated to the knob rank (or the elbow rank)."""

    name = "ddlr"
    options = (Opt("eps", float_, 0.05, "relative tolerance c of eps_l = c * ||Y_{l-1}||_F"),
               Opt("rank_rule", one_of(*RANK_RULES), "knob", "knob: build the allocated rank; elbow: min(rank, elbow)"),
               Opt("activation", any_, None, "relu | linear | {glob: activation} (default relu)"),
               Opt("ddlr_solver", one_of(*DDLR_SOLVERS), "auto", "cvxpy (SCS), admm (ours) or auto by size"),
               Opt("ddlr_max_iter", optional(int_), None, "solver iterations (none: the solver's default)"),
               Opt("ddlr_tol", optional(float_), None, "solver tolerance (none: the solver's default)"))
    description = "data-driven low rank: min ||U||_* s.t. ReLU-masked output error <= eps (Papadimitriou & Jain)"
    needs_data = True
    needs_raw = True

    def supports(self, target: Target) -> str | None:
        return conv_reason(target)

    def cost(self, target: Target, rank: int) -> Cost:
        return lowrank_cost(target, rank)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        opts = ctx.options
        eps = float(opts.get("eps", 0.05))
        rule = opts.get("rank_rule", "knob")
        if rule not in RANK_RULES:
            raise RankslimError(f"rank_rule must be one of {RANK_RULES}, got {rule!r}")
        solver = opts.get("ddlr_solver", "auto")
        if solver not in DDLR_SOLVERS:
            raise RankslimError(f"ddlr_solver must be one of {DDLR_SOLVERS}, got {solver!r}")
        if not 1 <= rank <= target.full_rank:
            raise RankError(f"rank {rank} is impossible for {target.name!r}: it must lie in [1, {target.full_rank}]")
        act = activation_for(target.name, opts.get("activation"))
        X, Y = raw_columns(target, ctx, "ddlr")
        W = target.matrix.to(torch.float64).cpu()
        b = target.module.bias.detach().to(torch.float64).cpu() if target.has_bias else None
        kw: dict[str, Any] = {}
        if opts.get("ddlr_max_iter") is not None:
            kw["max_iter"] = int(opts["ddlr_max_iter"])
        if opts.get("ddlr_tol") is not None:
            kw["tol"] = float(opts["ddlr_tol"])
        try:
            res = ddlr(X, Y, b, eps, W=W, solver=solver, activation=act, **kw)
        except RankslimError:
            if solver != "auto":
                raise
            # SCS can declare the problem infeasible when X comes from an already compressed model
            # (sequential calibration); the ADMM still returns its best compromise.
            res = ddlr(X, Y, b, eps, W=W, solver="admm", activation=act, **kw)
        elbow = elbow_rank(res.sigma)
        r = rank if rule == "knob" else max(1, min(rank, elbow))
        f = truncated_svd(res.U, r, solver=ctx.solver, generator=ctx.generator)
        dtype = target.module.weight.dtype
        bias = target.module.bias.detach() if target.has_bias else None
        layer = build_lowrank(target.module, r).set_factors(f.U.to(dtype), f.V.to(dtype), bias)
        info = {"rank": r, "knob": rank, "elbow_rank": elbow, "eps": eps, "rank_rule": rule, "activation": act,
                "calibration_columns": int(X.shape[1]), **{f"ddlr_{k}": v for k, v in res.info().items()}}
        return layer, info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_lowrank(module, int(info["rank"]))


__all__ = ["DDLRMethod", "RANK_RULES"]
