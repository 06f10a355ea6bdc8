"""CP decomposition of conv kernels (Lebedev et al. 2015), fitted by our vectorised CP-ALS.

Layer: 1x1 ``C -> R``, ``kh x 1`` depthwise, ``1 x kw`` depthwise, 1x1 ``R -> N`` (+ bias).
Knob ``r`` is the CP rank, in ``[1, R_max]`` with ``R_max = floor(N C kh kw / (N + C + kh + kw))``:
the rank at which the four factors store as many numbers as the kernel (a CP rank has no
"exact" end; allocators never need more).

``method_options``: ``n_iter`` (ALS sweeps, default 100), ``tol`` (stop when the relative error
moves less, default 1e-7), ``init`` ("svd" | "random"), ``max_bytes`` (memory guard, default
2 GiB: a larger estimate is refused with a message instead of a giant allocation).
"""
from __future__ import annotations

import torch
from torch import nn

from ..cost import Cost
from ..decompose.cp import DEFAULT_MAX_BYTES, cp_als
from ..errors import RankError
from ..layers.cp import CPConv2d
from ..options import Opt, float_, int_, one_of
from ..surgery import Target
from .base import DecomposeContext, Method, register
from .common import conv_geometry, cum_energy as _cum_energy, knob_spectrum
from .spatial import separable_kernel_support


def cp_cost(target: Target, rank: int) -> Cost:
    """Exact cost of :class:`CPConv2d`: 1x1 at input resolution, vertical at ``H_out x W_in``, the rest at output."""
    N, C, kh, kw, H_in, W_in, H_out, W_out = conv_geometry(target)
    bias = N if target.has_bias else 0
    params = rank * (C + kh + kw + N) + bias
    macs = H_in * W_in * C * rank + H_out * W_in * rank * kh + H_out * W_out * rank * (kw + N)
    return Cost(int(params), int(macs))


@register
class CPMethod(Method):
    """Rank-R CP of the 4-way kernel by ALS, executed as pointwise / depthwise / depthwise / pointwise convs."""

    name = "cp"
    options = (Opt("n_iter", int_, 100, "CP-ALS sweeps"),
               Opt("tol", float_, 1e-7, "stop when the relative error moves less than this"),
               Opt("init", one_of("svd", "random"), "svd", "initial factors"),
               Opt("max_bytes", int_, DEFAULT_MAX_BYTES, "memory guard: refuse a larger ALS working set"))
    description = "CP decomposition (Lebedev et al. 2015) by CP-ALS: 1x1, kx1 dw, 1xk dw, 1x1"

    def supports(self, target: Target) -> str | None:
        return separable_kernel_support(target, "CP acts on conv kernels; for Linear layers use 'svd' or 'tt'",
                                        "1x1 kernel: CP of a matrix is a truncated SVD; use 'svd'")

    def max_rank(self, target: Target) -> int:
        N, C, kh, kw = target.module.weight.shape
        return max(1, (N * C * kh * kw) // (N + C + kh + kw))

    def cost(self, target: Target, rank: int) -> Cost:
        return cp_cost(target, rank)

    def spectrum(self, target: Target) -> torch.Tensor:
        # No CP spectrum exists.  Proxy: the energy a truncated SVD of the im2col matrix keeps with the
        # same number of parameters, p(R) = R (N + C + kh + kw) / (N + C kh kw) (fractional p
        # interpolates linearly), so every knob step carries some energy.
        N, C, kh, kw = target.module.weight.shape
        s = torch.linalg.svdvals(target.matrix.to(torch.float64))
        k, kmax = s.numel(), self.max_rank(target)
        e = torch.cat([torch.zeros(1, dtype=torch.float64), torch.tensor(_cum_energy(s, k), dtype=torch.float64)])
        x = (torch.arange(1, kmax + 1, dtype=torch.float64) * (N + C + kh + kw) / (N + C * kh * kw)).clamp(max=k)
        lo = x.floor().long().clamp(max=k)
        hi = (lo + 1).clamp(max=k)
        curve = e[lo] + (x - lo) * (e[hi] - e[lo])
        return knob_spectrum(curve.tolist(), float((s ** 2).sum()))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        if not 1 <= rank <= self.max_rank(target):
            raise RankError(f"CP rank {rank} is out of range for layer {target.name!r}: use [1, {self.max_rank(target)}]")
        o = ctx.options
        W = target.module.weight.detach()
        try:
            res = cp_als(W, rank, n_iter_max=int(o.get("n_iter", 100)), tol=float(o.get("tol", 1e-7)),
                         init=str(o.get("init", "svd")), generator=ctx.generator,
                         max_bytes=o.get("max_bytes", DEFAULT_MAX_BYTES))
        except RankError as exc:
            raise RankError(f"layer {target.name!r}: {exc}") from None
        out_f, in_f, v_f, h_f = res.factors
        bias = target.module.bias.detach() if target.has_bias else None
        layer = CPConv2d.like(target.module, rank).set_factors(res.weights, out_f, in_f, v_f, h_f, bias)
        return layer, {"rank": int(rank), "rel_error": res.rel_error, "n_iter": res.n_iter, "damping": res.damping}

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return CPConv2d.like(module, int(info["rank"]))


__all__ = ["CPMethod", "cp_cost"]
