"""Data-free truncated SVD: low-rank Linear and channel-decomposed Conv2d."""
from __future__ import annotations

from torch import nn

from ..cost import Cost
from ..decompose.svd import truncated_svd
from ..errors import RankError
from ..layers.lowrank import LowRankConv2d, LowRankLinear
from ..surgery import Target
import torch

from .base import DecomposeContext, Method, ctx_matrix, register


def lowrank_cost(target: Target, rank: int) -> Cost:
    """Cost of ``U (m x r) @ V (r x n)`` applied at every output position, bias kept."""
    m, n = target.matrix_shape
    bias = m if target.has_bias else 0
    return Cost(rank * (m + n) + bias, target.positions * rank * (m + n))


def build_lowrank(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialised :class:`LowRankLinear` / :class:`LowRankConv2d` shaped like ``module``."""
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.like(module, rank)
    if isinstance(module, nn.Linear):
        return LowRankLinear.like(module, rank)
    raise RankError(f"low-rank layers replace Conv2d or Linear, not {type(module).__name__}")


@register
class SVDMethod(Method):
    """Truncated SVD of the (im2col) weight matrix: ``W ≈ U_r S_r V_r^T``."""

    name = "svd"
    description = "data-free truncated SVD (channel decomposition for convs)"

    def cost(self, target: Target, rank: int) -> Cost:
        return lowrank_cost(target, rank)

    def matricize(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def unmatricize(self, M: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return M.reshape(shape)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        f = truncated_svd(ctx_matrix(target, ctx), rank, solver=ctx.solver, generator=ctx.generator)
        bias = target.module.bias.detach() if target.has_bias else None
        layer = build_lowrank(target.module, rank).set_factors(f.U, f.V, bias)
        return layer, {"rank": rank, "solver": f.solver}

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_lowrank(module, int(info["rank"]))


__all__ = ["SVDMethod", "lowrank_cost", "build_lowrank"]
