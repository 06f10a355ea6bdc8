"""``zhang``: data-aware low rank in closed form (truncated generalised SVD, GreBdec eq. 3 with S = 0).

Options: ``damping`` (λ = damping·σ_max(XXᵀ/n), default 1e-4), ``bias_correction`` (default False).
Same cost and layers as ``svd`` (``LowRankConv2d`` / ``LowRankLinear``).
"""
from __future__ import annotations

from torch import nn

from ..cost import Cost
from ..decompose.zhang import zhang_lowrank
from ..options import Opt, bool_, float_
from ..surgery import Target
from .base import DecomposeContext, Method, register
from .common import corrected_bias, data_info, require_stats
from .svd import build_lowrank, lowrank_cost


@register
class ZhangMethod(Method):
    """``min_L 1/(2n)‖Y − LX‖² + λ/2‖W − L‖²``, ``rank(L) ≤ r``: ``L = [B A^{-1/2}]_r A^{-1/2}``."""

    name = "zhang"
    options = (Opt("damping", float_, 1e-4, "lambda = damping * sigma_max(XX^T/n): pull towards W where data is thin"),
               Opt("bias_correction", bool_, False, "shift the bias to remove the mean output error"))
    description = "data-aware low rank (Zhang et al.): truncated generalised SVD on calibration statistics"
    needs_data = True

    def cost(self, target: Target, rank: int) -> Cost:
        return lowrank_cost(target, rank)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        st, o = require_stats(ctx, self.name, target), ctx.options
        res = zhang_lowrank(target.matrix, st.XX, st.YX, st.n, rank, yy=st.yy,
                            damping=float(o.get("damping", 1e-4)), generator=ctx.generator)
        W_hat = res.U @ res.V
        if o.get("bias_correction", False):
            bias = corrected_bias(target, st, W_hat)
        else:
            bias = target.module.bias.detach() if target.has_bias else None
        layer = build_lowrank(target.module, rank).set_factors(res.U, res.V, bias)
        info = {"rank": rank, "lam": res.lam, "objective_final": res.objective, **data_info(st, W_hat)}
        if res.svd_relative_error is not None:
            info["svd_output_rel_error"] = round(res.svd_relative_error, 6)
        return layer, info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_lowrank(module, int(info["rank"]))


__all__ = ["ZhangMethod"]
