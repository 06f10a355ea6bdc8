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
from ..decompose.prune import iht_prune, magnitude_prune
from ..layers.sparse import SPARSE_NOTE, build_sparse
from ..options import Opt, bool_, either, float_, int_, optional
from ..surgery import Target
from .common import corrected_bias, data_info, require_stats
from .base import DecomposeContext, Method, register


def sparse_card(target: Target, knob: int) -> int:
    """Non-zeros the knob buys in the sparse-only model: ``min(m·k, ⌊knob·(m + k)/2⌋)``."""
    m, k = target.matrix_shape
    return int(min(m * k, (knob * (m + k)) // 2))


def sparse_cost(target: Target, card: int) -> Cost:
    """COO cost of ``card`` non-zeros: ``2·card`` (+ bias) parameters, ``card`` MACs per output position."""
    bias = target.matrix_shape[0] if target.has_bias else 0
    return Cost(2 * card + bias, target.positions * card)











def sparse_layer(target: Target, S: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A :class:`SparseConv2d` / :class:`SparseLinear` holding ``S: (m, k)`` on ``mask``."""
    layer = build_sparse(target.module)
    return layer.set_sparse(S, mask, bias)


def knob_importance(target: Target, importance: torch.Tensor) -> torch.Tensor:
    """Per-knob importance of a sparse method: ``sqrt`` of the importance the knob's extra non-zeros buy.

    ``importance: (m·k,)`` per weight (e.g. ``w²``).  Knob ``r`` keeps the ``sparse_card(r)`` most
    important weights, so the cumulative squared values of the result are exactly the importance kept
    at each knob — what energy-based allocators (CPTV) compare across layers.  Length ``max_rank``.
    """
    imp = importance.to(torch.float64).flatten().sort(descending=True).values
    csum = torch.cat([imp.new_zeros(1), imp.cumsum(0)])
    cards = torch.tensor([sparse_card(target, r) for r in range(0, target.full_rank + 1)])
    gains = (csum[cards[1:]] - csum[cards[:-1]]).clamp_min(0)
    return gains.sqrt()


@register
class PruneMethod(Method):
    """Magnitude pruning: keep the ``c`` largest ``|W_ij|`` (Han et al. 2015, threshold as a cardinality)."""

    name = "prune"
    description = "data-free magnitude pruning (sparse layer, COO cost)"

    def cost(self, target: Target, rank: int) -> Cost:
        return sparse_cost(target, sparse_card(target, rank))

    def spectrum(self, target: Target) -> torch.Tensor:
        # magnitude pruning keeps the largest |w|: its own importance, not the singular values
        return knob_importance(target, target.matrix.to(torch.float64) ** 2)

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
    options = (Opt("t", float_, -2.0, "lambda = 10^t * sigma_max(XX^T/n)"),
               Opt("eta", optional(either(float_, "auto")), None, "IHT step (none/auto: 1/sigma_max(A))"),
               Opt("iht_iters", int_, 100, "IHT iterations"),
               Opt("refit", bool_, True, "least squares on the final support"),
               Opt("bias_correction", bool_, False, "shift the bias to remove the mean output error"))
    description = "data-aware pruning: IHT on the output reconstruction (GreBdec model 2) + least-squares refit"
    needs_data = True

    def data_spectrum(self, target: Target, stats: Any) -> torch.Tensor:
        """Output-energy importance ``w_ij² · (XXᵀ/n)_jj`` (the diagonal of the data term's curvature)."""
        if stats is None:
            return self.spectrum(target)
        diag = torch.diagonal(stats.XX).to(torch.float64) / max(int(stats.n), 1)
        return knob_importance(target, target.matrix.to(torch.float64) ** 2 * diag[None, :])

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        return data_prune(target, sparse_card(target, rank), rank, ctx)


def data_prune(target: Target, card: int, rank: int, ctx: DecomposeContext,
               options: dict | None = None) -> tuple[nn.Module, dict]:
    """Build the data-aware sparse-only layer (shared by ``prune-data`` and ``grebdec`` on 1×1 convs).

    ``options``: the ``prune-data`` options (default ``ctx.options``; ``grebdec`` passes its own ``iht_*`` ones).
    """
    st, o = require_stats(ctx, "prune-data", target), (ctx.options if options is None else options)
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


__all__ = ["PruneMethod", "DataPruneMethod", "sparse_card", "sparse_cost", "data_prune"]
