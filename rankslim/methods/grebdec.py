"""``grebdec``: data-aware low rank + sparse (GreBdec Algorithm 1) on calibration statistics.

Knob → ``(r_L, c)`` exactly as ``godec`` (:func:`~rankslim.methods.godec.ls_split`,
``sparse_share = 0.5``).  1×1 convolutions (dimension reduction) use the sparse-only model (2)
as the paper does, with the knob → cardinality map of ``prune`` (``c = ⌊r(m + k)/2⌋``), solved by
IHT.  ``grebdec-ls`` is the same method with L + S on 1×1 convs too.

Options (``compress(method_options=...)``): ``t`` (λ = 10^t·σ_max(XXᵀ/n), default -2), ``eta``
(S step, default 1e-3 as in the paper, capped at 1/σ_max(A); "auto" = 1/σ_max(A)), ``K`` (QR updates repeated K+1 times, default 2),
``delta_r`` (rank step, default ⌈r_L/8⌉), ``max_iter`` (default 30), ``tol`` (default 1e-5),
``bias_correction`` (default False), and for the sparse-only layers the ``prune-data`` options.
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..cost import Cost
from ..decompose.grebdec import grebdec
from ..layers.sparse import SPARSE_NOTE, build_lowrank_sparse
from ..options import Opt, bool_, either, float_, int_, optional
from ..surgery import Target
from .base import DecomposeContext, Method, register
from .godec import ls_cost, ls_layer, ls_split
from .common import corrected_bias, data_info, require_stats
from .prune import data_prune, sparse_card, sparse_cost


def _eta(value) -> float | str:
    return "auto" if value == "auto" else float(value)


def is_pointwise(target: Target) -> bool:
    """True for 1×1 convolutions (GreBdec's dimension-reduction layers)."""
    return target.kind == "conv" and tuple(target.module.kernel_size) == (1, 1)


@register
class GreBdecMethod(Method):
    """``min 1/(2n)‖Y − (UV + S)X‖² + λ/2‖W − UV − S‖²``, ``card(S) ≤ c`` by greedy bilateral decomposition."""

    name = "grebdec"
    options = (Opt("t", float_, -2.0, "lambda = 10^t * sigma_max(XX^T/n)"),
               Opt("eta", either(float_, "auto"), 1e-3, "S step (capped at 1/sigma_max(A); auto = 1/sigma_max(A))"),
               Opt("K", int_, 2, "QR updates are repeated K+1 times"),
               Opt("delta_r", optional(int_), None, "rank step of the greedy growth (none: ceil(r_L/8))"),
               Opt("max_iter", int_, 30, "outer iterations"),
               Opt("tol", float_, 1e-5, "relative objective change that stops the iterations"),
               Opt("bias_correction", bool_, False, "shift the bias to remove the mean output error"),
               Opt("iht_eta", optional(either(float_, "auto")), None,
                   "IHT step on sparse-only (1x1) layers (none/auto: 1/sigma_max(A))"),
               Opt("iht_iters", int_, 100, "IHT iterations on sparse-only (1x1) layers"),
               Opt("refit", bool_, True, "least squares on the final support (sparse-only layers)"))
    description = "data-aware low rank + sparse (GreBdec, Algorithm 1); 1x1 convs sparse-only (model 2)"
    needs_data = True
    sparse_share: ClassVar[float] = 0.5
    #: model for 1×1 convs: "sparse" (paper's choice, model 2) or "lowrank+sparse"
    pointwise_model: ClassVar[str] = "sparse"

    def sparse_only(self, target: Target) -> bool:
        return self.pointwise_model == "sparse" and is_pointwise(target)

    @staticmethod
    def _iht_options(ctx: DecomposeContext) -> dict:
        """The ``prune-data`` options for the sparse-only layers, from grebdec's own ``iht_*`` ones."""
        o = ctx.options
        return {"t": o.get("t", -2.0), "eta": o.get("iht_eta"), "iht_iters": o.get("iht_iters", 100),
                "refit": o.get("refit", True), "bias_correction": o.get("bias_correction", False)}

    def cost(self, target: Target, rank: int) -> Cost:
        if self.sparse_only(target):
            return sparse_cost(target, sparse_card(target, rank))
        return ls_cost(target, *ls_split(target, rank, self.sparse_share))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        if self.sparse_only(target):
            layer, info = data_prune(target, sparse_card(target, rank), rank, ctx, self._iht_options(ctx))
            return layer, {**info, "model": "sparse (1x1 conv, model 2)"}
        r_l, c = ls_split(target, rank, self.sparse_share)
        if r_l == 0:
            layer, info = data_prune(target, c, rank, ctx, self._iht_options(ctx))
            return layer, {**info, "model": "sparse (knob too small for a low-rank part)"}
        st, o = require_stats(ctx, self.name, target), ctx.options
        res = grebdec(target.matrix, st.XX, st.YX, st.n, r_l, c, yy=st.yy, t=float(o.get("t", -2.0)),
                      eta=_eta(o.get("eta", 1e-3)), K=int(o.get("K", 2)), delta_r=o.get("delta_r"),
                      max_iter=int(o.get("max_iter", 30)), tol=float(o.get("tol", 1e-5)), generator=ctx.generator)
        W_hat = res.U @ res.V + res.S
        if o.get("bias_correction", False):
            bias = corrected_bias(target, st, W_hat)
        else:
            bias = target.module.bias.detach() if target.has_bias else None
        layer = ls_layer(target, res.U, res.V, res.S, res.mask, bias)
        info = {"rank": rank, "lowrank_rank": r_l, "nnz": c, "ranks": f"r{r_l}+nnz {c}", "model": "lowrank+sparse",
                "sparse_share": self.sparse_share, "lam": res.lam, "eta_used": res.eta_used,
                "iterations": res.iterations, "objective_first": res.objective[0],
                "objective_final": res.objective[-1], "sparse_note": SPARSE_NOTE, **data_info(st, W_hat)}
        return layer, info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_lowrank_sparse(module, int(info.get("lowrank_rank", 0)))


@register
class GreBdecLSMethod(GreBdecMethod):
    """GreBdec with the low-rank + sparse model on 1×1 convolutions too."""

    name = "grebdec-ls"
    description = "GreBdec with low rank + sparse on every layer (1x1 convs included)"
    pointwise_model = "lowrank+sparse"


__all__ = ["GreBdecMethod", "GreBdecLSMethod", "is_pointwise"]
