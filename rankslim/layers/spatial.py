"""Spatially separated convolution (Jaderberg et al. 2014 scheme 2, Tai et al. 2016 closed form).

``kh x kw`` conv ``C -> N`` becomes a ``kh x 1`` conv ``C -> K`` (child ``vertical``) and a
``1 x kw`` conv ``K -> N`` (child ``horizontal``, carrying the bias).  Stride, padding and dilation
are split by axis: the vertical conv takes the height components, the horizontal conv the width
ones.  Padding modes other than zeros (reflect, replicate, circular) also commute with this
split, because 2-D padding is applied axis by axis and the vertical conv acts on each column
independently.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedLayerError


def split_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Numeric ``(pad_h, pad_w)`` of ``conv``; ``'valid'`` -> 0, symmetric ``'same'`` -> half the total.

    Raises :class:`UnsupportedLayerError` for ``'same'`` padding that PyTorch applies asymmetrically
    (an odd ``dilation * (k - 1)``), which a per-axis split cannot express with symmetric pads.
    """
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedLayerError(
                    f"padding='same' with kernel {tuple(conv.kernel_size)} and dilation {tuple(conv.dilation)} pads "
                    "asymmetrically; separated convs cannot reproduce it — use the 'svd' or 'tucker' method")
            out.append(total // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


class SpatialConv2d(nn.Module):
    """``kh x 1`` conv ``C -> rank`` (``vertical``) then ``1 x kw`` conv ``rank -> N`` (``horizontal``)."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise UnsupportedLayerError("spatial separation needs groups == 1")
        ph, pw = split_padding(conv)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        w = conv.weight
        self.rank = rank
        self.vertical = nn.Conv2d(conv.in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                                  dilation=(dh, 1), bias=False, padding_mode=conv.padding_mode,
                                  device=w.device, dtype=w.dtype)
        self.horizontal = nn.Conv2d(rank, conv.out_channels, (1, kw), stride=(1, sw), padding=(0, pw),
                                    dilation=(1, dw), bias=conv.bias is not None, padding_mode=conv.padding_mode,
                                    device=w.device, dtype=w.dtype)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> "SpatialConv2d":
        """An (uninitialised) separated layer with ``conv``'s hyper-parameters."""
        return cls(conv, rank)

    @torch.no_grad()
    def set_factors(self, vertical: torch.Tensor, horizontal: torch.Tensor,
                    bias: torch.Tensor | None) -> "SpatialConv2d":
        """Load ``vertical: (rank, C, kh, 1)``, ``horizontal: (N, rank, 1, kw)`` and the bias ``(N,)``."""
        self.vertical.weight.copy_(vertical)
        self.horizontal.weight.copy_(horizontal)
        if bias is not None and self.horizontal.bias is not None:
            self.horizontal.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))

    # Some modules read their children's ``.weight`` directly (TransformerEncoderLayer's fast path does):
    # expose the dense equivalent, computed on demand and read-only.
    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``(N, C, kh, kw)``: ``sum_k H[n, k, j] V[k, c, i]``."""
        return torch.einsum("nkj,kci->ncij", self.horizontal.weight[:, :, 0, :], self.vertical.weight[:, :, :, 0])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.horizontal.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
