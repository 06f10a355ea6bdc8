"""Sparse (fixed-mask) layers and low-rank + sparse layers.

* :class:`SparseLinear` / :class:`SparseConv2d`: ``weight ⊙ mask`` with a fixed boolean ``mask``
  buffer.  The forward pass multiplies by the mask, so gradients of masked entries are zero by
  construction and training never revives a pruned weight (GreBdec section 6, Han et al.).
* :class:`LowRankSparseLinear` / :class:`LowRankSparseConv2d`: ``y = (U V + S) x + b`` — a low-rank
  branch (:class:`~rankslim.layers.lowrank.LowRankLinear` / ``LowRankConv2d``, which holds the bias)
  plus a sparse branch with the same stride / padding / dilation, summed.

Cost (``rankslim_cost``): a sparse branch is counted as COO storage, one value and one index per
non-zero (``2·nnz`` parameters, as DDLR counts it), and ``nnz`` MACs per output position — what a
sparse kernel would execute, not what the dense masked PyTorch op executes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import Cost
from .lowrank import LowRankConv2d, LowRankLinear

#: the note the report shows for layers with a sparse part
SPARSE_NOTE = ("sparse parts are counted as COO storage: 2 parameters (value + index) per non-zero, and "
               "nnz MACs per output position (what a sparse kernel runs; the PyTorch module itself runs a "
               "dense masked op)")


def _positions(out_shape: tuple[int, ...], conv: bool) -> int:
    if conv:
        return int(out_shape[-1] * out_shape[-2])
    n = 1
    for s in out_shape[:-1]:
        n *= int(s)
    return n


class _Masked(nn.Module):
    """Shared part of the masked layers: ``weight`` parameter, boolean ``mask`` buffer, ``nnz``."""

    weight: nn.Parameter
    mask: torch.Tensor

    @property
    def nnz(self) -> int:
        """Number of kept (non-masked) weights."""
        return int(self.mask.sum())

    @torch.no_grad()
    def set_sparse(self, values: torch.Tensor, mask: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> "_Masked":
        """Load the dense-shaped ``values`` (zeroed outside ``mask``; ``mask`` = ``values != 0`` if omitted).

        ``values`` may be given in matrix view ``(out, in·kh·kw)``; it is reshaped to the weight.
        """
        values = values.reshape(self.weight.shape).to(self.weight)
        mask = (values != 0) if mask is None else mask.reshape(self.weight.shape).to(torch.bool)
        self.mask.copy_(mask.to(self.mask.device))
        self.weight.copy_(values * self.mask)
        b = getattr(self, "bias", None)
        if bias is not None and b is not None:
            b.copy_(bias)
        return self

    def masked_weight(self) -> torch.Tensor:
        """``weight ⊙ mask`` (what the forward pass uses)."""
        return self.weight * self.mask

    def _bias_params(self) -> int:
        b = getattr(self, "bias", None)
        return int(b.numel()) if b is not None else 0


class SparseLinear(_Masked):
    """``y = (weight ⊙ mask) x + b`` with ``weight: (out, in)`` and a fixed boolean ``mask``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))

    @classmethod
    def like(cls, linear: nn.Linear, bias: bool | None = None) -> "SparseLinear":
        """An (all-kept, zero) sparse layer with ``linear``'s sizes, device and dtype."""
        w = linear.weight
        b = (linear.bias is not None) if bias is None else bias
        return cls(linear.in_features, linear.out_features, b, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def rankslim_cost(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Cost:
        nnz = self.nnz
        return Cost(2 * nnz + self._bias_params(), _positions(out_shape, False) * nnz)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}"


class SparseConv2d(_Masked):
    """A Conv2d whose kernel is ``weight ⊙ mask``; stride, padding (any mode), dilation kept; groups = 1."""

    def __init__(self, conv: nn.Conv2d, bias: bool | None = None) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("SparseConv2d replaces ungrouped convolutions (groups == 1)")
        w = conv.weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.padding_mode = conv.dilation, conv.padding_mode
        self._pad = list(getattr(conv, "_reversed_padding_repeated_twice", []))
        has_bias = (conv.bias is not None) if bias is None else bias
        self.weight = nn.Parameter(torch.zeros_like(w))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels, device=w.device, dtype=w.dtype)) if has_bias else None
        self.register_buffer("mask", torch.ones(w.shape, dtype=torch.bool, device=w.device))

    @classmethod
    def like(cls, conv: nn.Conv2d, bias: bool | None = None) -> "SparseConv2d":
        """An (all-kept, zero) sparse conv with ``conv``'s hyper-parameters."""
        return cls(conv, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.masked_weight()
        if self.padding_mode != "zeros" or self.padding == "same":
            # explicit padding: other modes, and 'same' (possibly asymmetric) without torch's copy warning
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def rankslim_cost(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Cost:
        nnz = self.nnz
        return Cost(2 * nnz + self._bias_params(), _positions(out_shape, True) * nnz)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, nnz={self.nnz}")


class _LowRankPlusSparse(nn.Module):
    """Shared body of the L + S layers: ``lowrank`` branch (holds the bias) plus ``sparse`` branch (no bias)."""

    _conv: bool = False
    lowrank: nn.Module
    sparse: nn.Module

    def set_factors(self, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor, mask: torch.Tensor | None,
                    bias: torch.Tensor | None) -> "_LowRankPlusSparse":
        """Load ``U: (m, rank)``, ``V: (rank, k)``, sparse values ``S: (m, k)`` (+ ``mask``) and the bias ``(m,)``;
        ``m x k`` is the (im2col) matrix view of the replaced layer."""
        self.lowrank.set_factors(U, V, bias)
        self.sparse.set_sparse(S, mask)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x) + self.sparse(x)

    @property
    def weight(self) -> torch.Tensor:
        """Dense equivalent ``U V + S ⊙ mask`` in the replaced layer's weight shape."""
        return self.lowrank.weight + self.sparse.masked_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lowrank.bias

    def rankslim_cost(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Cost:
        w = self.sparse.weight
        m, k, r = int(w.shape[0]), int(w[0].numel()), self.rank
        p = _positions(out_shape, self._conv)
        b = self.bias.numel() if self.bias is not None else 0
        nnz = self.sparse.nnz
        return Cost(r * (m + k) + b + 2 * nnz, p * (r * (m + k) + nnz))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, nnz={self.sparse.nnz}"


class LowRankSparseLinear(_LowRankPlusSparse):
    """``y = U (V x) + (S ⊙ mask) x + b``: child ``lowrank`` (:class:`LowRankLinear`, holds the bias)
    and child ``sparse`` (:class:`SparseLinear` without bias)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.lowrank = LowRankLinear.like(linear, rank)
        self.sparse = SparseLinear.like(linear, bias=False)

    @classmethod
    def like(cls, linear: nn.Linear, rank: int) -> "LowRankSparseLinear":
        return cls(linear, rank)


class LowRankSparseConv2d(_LowRankPlusSparse):
    """Sum of a channel-decomposed conv (child ``lowrank``, :class:`LowRankConv2d`, holds the bias) and
    a masked ``kh×kw`` conv (child ``sparse``) with the original stride / padding / dilation.

    In the im2col view ``W: (N, C·kh·kw) ≈ U (N, r) @ V (r, C·kh·kw) + S``.
    """

    _conv = True

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.lowrank = LowRankConv2d.like(conv, rank)
        self.sparse = SparseConv2d.like(conv, bias=False)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> "LowRankSparseConv2d":
        return cls(conv, rank)


def build_sparse(module: nn.Module) -> nn.Module:
    """An uninitialised :class:`SparseLinear` / :class:`SparseConv2d` shaped like ``module`` (bias kept)."""
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.like(module)
    if isinstance(module, nn.Linear):
        return SparseLinear.like(module)
    raise TypeError(f"sparse layers replace Conv2d or Linear, not {type(module).__name__}")


def build_lowrank_sparse(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialised L+S layer shaped like ``module``; ``rank == 0`` gives the sparse-only layer."""
    if rank == 0:
        return build_sparse(module)
    if isinstance(module, nn.Conv2d):
        return LowRankSparseConv2d.like(module, rank)
    if isinstance(module, nn.Linear):
        return LowRankSparseLinear.like(module, rank)
    raise TypeError(f"L+S layers replace Conv2d or Linear, not {type(module).__name__}")


__all__ = ["SparseLinear", "SparseConv2d", "LowRankSparseLinear", "LowRankSparseConv2d", "build_sparse",
           "build_lowrank_sparse", "SPARSE_NOTE"]
