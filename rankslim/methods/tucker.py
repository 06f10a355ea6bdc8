"""Tucker-2 / Tucker-1 (Kim et al. 2016): 1x1 ``C -> R3``, ``kh x kw`` core ``R3 -> R4``, 1x1 ``R4 -> N``.

Rank knob: one integer ``r`` in ``[1, max(C, N)]`` maps to ``(R3, R4) = (ceil(r C / max(C, N)),
ceil(r N / max(C, N)))`` — both channel modes shrink in proportion to their size, and the top of
the range is the exact ``(C, N)``.  Tucker-1 (no input factor; used for 1x1 kernels and for inputs
with at most :data:`TUCKER1_MAX_IN` channels, as Kim et al. do for the first layer) maps ``r`` to
``R4 = r`` in ``[1, min(N, C kh kw)]``.  The ranks are recorded in ``info["ranks"]`` as
``[R3, R4]`` (``R3 = null`` for Tucker-1).

Budget-free rank choice (Kim et al.): :meth:`TuckerMethod.evbmf_ranks` runs EVBMF on the two
unfoldings; :meth:`TuckerMethod.evbmf_knob` is the smallest knob whose ranks cover them, and
:func:`evbmf_knobs` gives that knob for every target of a model, ready for
``compress(model, "tucker", ranks=evbmf_knobs(model, input_shape))`` (also for "svd" and "spatial").
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..cost import Cost, trace_shapes
from ..decompose.tucker import evbmf_tucker_ranks, tucker2, unfold_in, unfold_out
from ..errors import RankError
from ..layers.tucker import TuckerConv2d
from ..options import Opt, int_
from ..surgery import Target, select_targets
from .common import conv_geometry, cum_energy as _cum_energy, knob_spectrum
from .base import DecomposeContext, Method, register

#: inputs with at most this many channels get Tucker-1 (Kim et al.: the first layer, C = 3)
TUCKER1_MAX_IN = 4








def is_tucker1(target: Target) -> bool:
    """True when ``target`` is decomposed by Tucker-1 (1x1 kernel or few input channels)."""
    kh, kw = target.module.kernel_size
    return kh * kw == 1 or target.module.in_channels <= TUCKER1_MAX_IN


def knob_to_ranks(target: Target, r: int) -> tuple[int | None, int]:
    """``(R3, R4)`` for knob ``r`` (``R3 = None`` for Tucker-1); see the module docstring."""
    N, C = target.module.out_channels, target.module.in_channels
    if is_tucker1(target):
        return None, int(r)
    big = max(C, N)
    return max(1, math.ceil(r * C / big)), max(1, math.ceil(r * N / big))


def tucker_cost(target: Target, ranks: tuple[int | None, int]) -> Cost:
    """Exact cost of :class:`TuckerConv2d`: the first 1x1 runs at input resolution, the rest at output."""
    N, C, kh, kw, H_in, W_in, H_out, W_out = conv_geometry(target)
    r3, r4 = ranks
    bias = N if target.has_bias else 0
    if r3 is None:
        params = r4 * C * kh * kw + N * r4 + bias
        macs = H_out * W_out * (r4 * C * kh * kw + N * r4)
    else:
        params = C * r3 + r4 * r3 * kh * kw + N * r4 + bias
        macs = H_in * W_in * C * r3 + H_out * W_out * (r3 * r4 * kh * kw + N * r4)
    return Cost(int(params), int(macs))


@register
class TuckerMethod(Method):
    """HOSVD (optionally HOOI-refined) Tucker-2 of the kernel; Tucker-1 for 1x1 kernels and tiny inputs.

    ``method_options``: ``hooi_iters`` (int, default 0: plain HOSVD).
    """

    name = "tucker"
    options = (Opt("hooi_iters", int_, 0, "HOOI refinement sweeps after HOSVD (0: plain HOSVD)"),)
    description = "Tucker-2 channel decomposition (Kim et al. 2016); Tucker-1 for 1x1 convs"

    def supports(self, target: Target) -> str | None:
        if target.kind != "conv":
            return "Tucker-2 acts on conv kernels; for Linear layers use 'svd' (Tucker-1 of a matrix) or 'tt'"
        return None

    def max_rank(self, target: Target) -> int:
        N, C = target.module.out_channels, target.module.in_channels
        if is_tucker1(target):
            kh, kw = target.module.kernel_size
            return min(N, C * kh * kw)
        return max(C, N)

    def cost(self, target: Target, rank: int) -> Cost:
        return tucker_cost(target, knob_to_ranks(target, rank))

    def spectrum(self, target: Target) -> torch.Tensor:
        K = target.module.weight.detach().to(torch.float64)
        total = float(K.square().sum())
        s4 = torch.linalg.svdvals(unfold_out(K))
        kmax = self.max_rank(target)
        N, C = target.module.out_channels, target.module.in_channels
        e4 = _cum_energy(s4, N)
        if is_tucker1(target):
            return knob_spectrum([e4[r - 1] for r in range(1, kmax + 1)], total)
        e3 = _cum_energy(torch.linalg.svdvals(unfold_in(K)), C)
        # HOSVD error bound: ||K - K_hat||^2 <= tail_3 + tail_4, so captured >= e3 + e4 - 1
        curve = []
        for r in range(1, kmax + 1):
            r3, r4 = knob_to_ranks(target, r)
            curve.append(max(0.0, e3[r3 - 1] + e4[r4 - 1] - 1.0))
        return knob_spectrum(curve, total)

    def evbmf_ranks(self, target: Target) -> tuple[int | None, int]:
        """Kim et al.'s EVBMF ranks ``(R3, R4)`` of the two channel unfoldings (``R3 = None`` for Tucker-1)."""
        return evbmf_tucker_ranks(target.module.weight, tucker1=is_tucker1(target))

    def evbmf_knob(self, target: Target) -> int:
        """Smallest knob whose ``(R3, R4)`` are at least the EVBMF ranks (exact for Tucker-1)."""
        r3, r4 = self.evbmf_ranks(target)
        if r3 is None:
            return min(r4, self.max_rank(target))
        N, C = target.module.out_channels, target.module.in_channels
        big = max(C, N)
        # R3(r) >= r3  <=>  r >= (r3 - 1) * big / C (strictly), same for R4
        need = max(math.floor((r3 - 1) * big / C) + 1, math.floor((r4 - 1) * big / N) + 1)
        return max(1, min(need, self.max_rank(target)))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        if not 1 <= rank <= self.max_rank(target):
            raise RankError(f"Tucker knob {rank} is impossible for layer {target.name!r}: use [1, {self.max_rank(target)}]")
        ranks = knob_to_ranks(target, rank)
        n_iter = int(ctx.options.get("hooi_iters", 0))
        f = tucker2(target.module.weight.detach(), ranks, n_iter=n_iter)
        bias = target.module.bias.detach() if target.has_bias else None
        layer = TuckerConv2d.like(target.module, ranks).set_factors(f.core, f.U_in, f.U_out, bias)
        info = {"rank": int(rank), "ranks": [ranks[0], ranks[1]], "scheme": "tucker1" if ranks[0] is None else "tucker2",
                "hooi_iters": f.n_iter, "rel_error": f.rel_error}
        return layer, info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        r3, r4 = info["ranks"]
        return TuckerConv2d.like(module, (None if r3 is None else int(r3), int(r4)))


def evbmf_knobs(model: nn.Module, input_shape: Iterable[int], method: str = "tucker",
                include: Iterable[str] | None = None, exclude: Iterable[str] | None = None) -> dict[str, int]:
    """Budget-free EVBMF rank knob of every target of ``model`` that ``method`` supports.

    Methods defining ``evbmf_knob(target)`` (``tucker``: Kim et al.'s rule on the two channel
    unfoldings; ``spatial``: on Tai's rearranged kernel) use it; any other method (e.g. ``svd``)
    gets ``evbmf(target.matrix).rank`` clipped to ``[1, max_rank]``.  Use as
    ``compress(model, method, ranks=evbmf_knobs(model, input_shape, method))``.
    """
    from ..decompose.evbmf import evbmf
    from .base import get_method
    shapes = trace_shapes(model, tuple(input_shape))
    targets, _ = select_targets(model, shapes, include, exclude)
    m = get_method(method)
    out: dict[str, int] = {}
    for t in targets:
        if m.supports(t) is not None:
            continue
        rule = getattr(m, "evbmf_knob", None)
        k = rule(t) if callable(rule) else evbmf(t.matrix).rank
        out[t.name] = max(1, min(int(k), m.max_rank(t)))
    return out


__all__ = ["TuckerMethod", "knob_to_ranks", "tucker_cost", "evbmf_knobs", "is_tucker1",
           "TUCKER1_MAX_IN"]
