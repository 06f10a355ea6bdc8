"""Pruning methods: ``prune`` (data-free magnitude, Han et al.) and ``prune-data`` (GreBdec model 2 by IHT).

Knob → cardinality: knob ``r`` buys the parameters of a rank-``r`` factorization, ``r·(m + k)``;
COO storage costs 2 numbers per non-zero, so ``c = min(m·k, ⌊r·(m + k)/2⌋)``.  At every knob the
pruned layer therefore stores as many numbers as ``svd`` at rank ``r`` (and runs half its MACs).

``prune-data`` options (``compress(method_options=...)``): ``t`` (λ = 10^t·σ_max(XXᵀ/n), default
-2), ``eta`` (IHT step, default 1/σ_max(A)), ``iht_iters`` (default 100), ``refit`` (least squares on
the final support, default True), ``bias_correction`` (default False).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cost import Cost
from ..errors import RankslimError
from ..decompose.prune import iht_prune, magnitude_prune
from ..layers.sparse import SPARSE_NOTE, build_sparse
from ..surgery import Target
from .base import DecomposeContext, Method, register


def sparse_card(target: Target, knob: int) -> int:
    """Non-zeros the knob buys in the sparse-only model: ``min(m·k, ⌊knob·(m + k)/2⌋)``."""
    m, k = target.matrix_shape
    return int(min(m * k, (knob * (m + k)) // 2))


def sparse_cost(target: Target, card: int) -> Cost:
    """COO cost of ``card`` non-zeros: ``2·card`` (+ bias) parameters, ``card`` MACs per output position."""
    bias = target.matrix_shape[0] if target.has_bias else 0
    return Cost(2 * card + bias, target.positions * card)


def corrected_bias(target: Target, stats: Any, W_hat: torch.Tensor) -> torch.Tensor | None:
    """Bias that removes the mean output error: ``b + (Σy − Ŵ Σx)/n`` (``None`` if the layer has no bias)."""
    if not target.has_bias:
        return None
    b = target.module.bias.detach().to(torch.float64)
    shift = (stats.y_sum - W_hat.to(stats.x_sum) @ stats.x_sum) / stats.n
    return (b + shift.to(b)).to(target.module.bias)


def require_stats(ctx: DecomposeContext, method: str, target: Target) -> Any:
    """The calibration statistics in ``ctx``, or a clear error when a caller decomposed without them."""
    if ctx.stats is None:
        raise RankslimError(f"method {method!r} needs calibration statistics for layer {target.name!r}, but none "
                            "were given (pass data=... to compress; allocators that build candidate models "
                            "without a calibrator cannot use data-aware methods)")
    return ctx.stats


def data_info(stats: Any, W_hat: torch.Tensor) -> dict:
    """Facts about the calibration fit worth reporting (JSON-able)."""
    return {"output_rel_error": round(stats.relative_error(W_hat), 6), "calib_columns": int(stats.n),
            "sequential": bool(stats.sequential)}


def sparse_layer(target: Target, S: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A :class:`SparseConv2d` / :class:`SparseLinear` holding ``S: (m, k)`` on ``mask``."""
    layer = build_sparse(target.module)
    return layer.set_sparse(S, mask, bias)


@register
class PruneMethod(Method):
    """Magnitude pruning: keep the ``c`` largest ``|W_ij|`` (Han et al. 2015, threshold as a cardinality)."""

    name = "prune"
    description = "data-free magnitude pruning (sparse layer, COO cost)"

    def cost(self, target: Target, rank: int) -> Cost:
        return sparse_cost(target, sparse_card(target, rank))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        c = sparse_card(target, rank)
        S, mask = magnitude_prune(target.matrix, c)
        bias = target.module.bias.detach() if target.has_bias else None
        layer = sparse_layer(target, S, mask, bias)
        return layer, {"rank": rank, "ranks": f"nnz {c}", "nnz": c, "lowrank_rank": 0, "mode": "magnitude",
                       "sparse_note": SPARSE_NOTE}

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_sparse(module)


@register
class DataPruneMethod(PruneMethod):
    """GreBdec model (2): ``min 1/(2n)‖Y − SX‖² + λ/2‖W − S‖²``, ``card(S) ≤ c``, by IHT + support refit."""

    name = "prune-data"
    description = "data-aware pruning: IHT on the output reconstruction (GreBdec model 2) + least-squares refit"
    needs_data = True

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        return data_prune(target, sparse_card(target, rank), rank, ctx)


def data_prune(target: Target, card: int, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
    """Build the data-aware sparse-only layer (shared by ``prune-data`` and ``grebdec`` on 1×1 convs)."""
    st, o = require_stats(ctx, "prune-data", target), ctx.options
    res = iht_prune(target.matrix, st.XX, st.YX, st.n, card, yy=st.yy, t=o.get("t", -2.0),
                    eta=None if o.get("eta") in (None, "auto") else float(o["eta"]),
                    iters=int(o.get("iht_iters", 100)), refit=bool(o.get("refit", True)), generator=ctx.generator)
    if o.get("bias_correction", False):
        bias = corrected_bias(target, st, res.S)
    else:
        bias = target.module.bias.detach() if target.has_bias else None
    layer = sparse_layer(target, res.S, res.mask, bias)
    final = res.refit if res.refit is not None else res.objective[-1]
    info = {"rank": rank, "ranks": f"nnz {card}", "nnz": card, "lowrank_rank": 0, "mode": "iht",
            "lam": res.lam, "eta_used": res.eta, "iterations": len(res.objective) - 1,
            "objective_first": res.objective[0], "objective_final": final,
            "sparse_note": SPARSE_NOTE, **data_info(st, res.S)}
    return layer, info


__all__ = ["PruneMethod", "DataPruneMethod", "sparse_card", "sparse_cost", "corrected_bias", "data_prune", "require_stats"]
