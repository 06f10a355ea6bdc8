"""Spatial separation (Jaderberg et al. 2014 scheme 2 with Tai et al. 2016's closed form): ``kh x 1`` then ``1 x kw``."""
from __future__ import annotations

import torch
from torch import nn

from ..cost import Cost
from ..decompose.evbmf import evbmf
from ..decompose.spatial import spatial_matrix, spatial_max_rank, spatial_separation, spatial_singular_values
from ..errors import UnsupportedLayerError
from ..layers.spatial import SpatialConv2d, split_padding
from ..surgery import Target
from .common import conv_geometry
from .base import DecomposeContext, Method, ctx_weight, register





def spatial_cost(target: Target, rank: int) -> Cost:
    """Exact cost of :class:`SpatialConv2d` at ``rank``: the vertical conv runs at ``H_out x W_in``."""
    N, C, kh, kw, _, W_in, H_out, W_out = conv_geometry(target)
    bias = N if target.has_bias else 0
    params = rank * C * kh + N * rank * kw + bias
    macs = H_out * W_in * rank * C * kh + H_out * W_out * N * rank * kw
    return Cost(int(params), int(macs))


def separable_kernel_support(target: Target, linear_reason: str, pointwise_reason: str) -> str | None:
    """Why a kernel cannot be split into vertical and horizontal convs (spatial, CP), or ``None`` when it can.

    Linear layers and 1x1 kernels get the given reasons; padding that cannot be split (asymmetric
    'same') gets :func:`split_padding`'s message.
    """
    if target.kind != "conv":
        return linear_reason
    kh, kw = target.module.kernel_size
    if kh * kw == 1:
        return pointwise_reason
    try:
        split_padding(target.module)
    except UnsupportedLayerError as exc:
        return str(exc)
    return None


@register
class SpatialMethod(Method):
    """Tai et al.'s optimal vertical/horizontal separation from the SVD of the ``(C kh, N kw)`` rearranged kernel."""

    name = "spatial"
    description = "k x k -> (k x 1, 1 x k) spatial separation (Tai et al. 2016 closed form)"

    def supports(self, target: Target) -> str | None:
        return separable_kernel_support(target, "Linear layers have no spatial kernel; use 'svd' or 'tt'",
                                        "1x1 kernel: nothing to separate spatially; use 'svd'")

    def max_rank(self, target: Target) -> int:
        return spatial_max_rank(tuple(target.module.weight.shape))

    def cost(self, target: Target, rank: int) -> Cost:
        return spatial_cost(target, rank)

    def spectrum(self, target: Target) -> torch.Tensor:
        # Eckart-Young on the rearranged kernel: the squared tail is exactly the kernel error
        return spatial_singular_values(target.module.weight)

    def matricize(self, weight: torch.Tensor) -> torch.Tensor:
        return spatial_matrix(weight)

    def unmatricize(self, M: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        # inverse of spatial_matrix: (C kh, N kw) -> (C, kh, N, kw) -> (N, C, kh, kw)
        N, C, kh, kw = shape
        return M.reshape(C, kh, N, kw).permute(2, 0, 1, 3)

    def spectrum_shape(self, target: Target) -> tuple[int, int]:
        N, C, kh, kw = target.module.weight.shape
        return (C * kh, N * kw)

    def evbmf_knob(self, target: Target) -> int:
        """EVBMF rank of the rearranged kernel (at least 1): a budget-free rank choice."""
        return max(1, evbmf(spatial_matrix(target.module.weight.detach())).rank)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        W = ctx_weight(target, ctx)
        f = spatial_separation(W, rank)
        s = spatial_singular_values(W)
        rel = float(s[rank:].norm() / (s.norm() or 1.0))
        bias = target.module.bias.detach() if target.has_bias else None
        layer = SpatialConv2d.like(target.module, rank).set_factors(f.vertical, f.horizontal, bias)
        return layer, {"rank": int(rank), "rel_error": rel}

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return SpatialConv2d.like(module, int(info["rank"]))


__all__ = ["SpatialMethod", "spatial_cost"]
