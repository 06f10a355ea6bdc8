"""Tensor-Train Linear layers (Novikov et al. 2015) by TT-SVD.

Sizes are factorized automatically into :data:`TT_D` factors each (:func:`factorize_size`, the
most balanced split; a size with few prime factors gets modes of size 1).  Knob ``r``: every
inner TT-rank is ``min(r, full rank of that bond)``; ``max_rank`` is the largest full bond rank,
where the layer is exact.  Conv layers are not supported (use 'tucker' or 'cp').
"""
from __future__ import annotations

import torch
from torch import nn

from ..cost import Cost
from ..decompose.tt import factorize_size, tt_full_ranks, tt_singular_values, tt_svd_matrix
from ..errors import RankError
from ..layers.tt import TTLinear, tt_linear_macs
from ..surgery import Target
from .base import DecomposeContext, Method, register

#: number of TT cores
TT_D = 3


def tt_shape(target: Target) -> tuple[list[int], list[int]]:
    """``(out_factors, in_factors)`` of a Linear target (each of length :data:`TT_D`, descending)."""
    lin = target.module
    return factorize_size(lin.out_features, TT_D), factorize_size(lin.in_features, TT_D)


def knob_to_tt_ranks(target: Target, r: int) -> list[int]:
    """``[1, min(r, full_1), ..., min(r, full_{d-1}), 1]``."""
    full = tt_full_ranks(*tt_shape(target))
    return [1] + [min(int(r), f) for f in full[1:-1]] + [1]


def tt_cost(target: Target, rank: int) -> Cost:
    """Exact cost of :class:`TTLinear` at knob ``rank``: cores + bias, contraction-chain MACs per position."""
    outf, inf = tt_shape(target)
    ranks = knob_to_tt_ranks(target, rank)
    params = sum(ranks[k] * outf[k] * inf[k] * ranks[k + 1] for k in range(len(inf)))
    params += target.module.out_features if target.has_bias else 0
    return Cost(int(params), int(target.positions * tt_linear_macs(outf, inf, ranks)))


@register
class TTMethod(Method):
    """TT-SVD of the reshaped Linear weight into three cores; forward contracts cores without forming W."""

    name = "tt"
    description = "Tensor-Train Linear layer (Novikov et al. 2015) by TT-SVD"

    def supports(self, target: Target) -> str | None:
        if target.kind != "linear":
            return "Tensor-Train is implemented for Linear layers; for convs use 'tucker', 'cp' or 'spatial'"
        outf, inf = tt_shape(target)
        if sum(1 for m, n in zip(outf, inf) if m * n > 1) < 2:
            return (f"sizes {target.module.out_features}x{target.module.in_features} do not factor into two or more "
                    "non-trivial TT modes; use 'svd'")
        return None

    def max_rank(self, target: Target) -> int:
        return max(tt_full_ranks(*tt_shape(target))[1:-1])

    def cost(self, target: Target, rank: int) -> Cost:
        return tt_cost(target, rank)

    def spectrum(self, target: Target) -> torch.Tensor:
        return tt_singular_values(target.module.weight, *tt_shape(target))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        if not 1 <= rank <= self.max_rank(target):
            raise RankError(f"TT knob {rank} is impossible for layer {target.name!r}: use [1, {self.max_rank(target)}]")
        outf, inf = tt_shape(target)
        ranks = knob_to_tt_ranks(target, rank)
        f = tt_svd_matrix(target.module.weight.detach(), outf, inf, ranks)
        bias = target.module.bias.detach() if target.has_bias else None
        layer = TTLinear.like(target.module, inf, outf, ranks).set_cores(f.cores, bias)
        return layer, {"rank": int(rank), "ranks": ranks, "in_factors": inf, "out_factors": outf,
                       "rel_error": f.rel_error}

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return TTLinear.like(module, [int(x) for x in info["in_factors"]], [int(x) for x in info["out_factors"]],
                             [int(x) for x in info["ranks"]])


__all__ = ["TTMethod", "tt_cost", "tt_shape", "knob_to_tt_ranks", "TT_D"]
