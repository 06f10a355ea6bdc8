"""CP convolution (Lebedev et al. 2015): 1x1 ``C -> R``, ``kh x 1`` depthwise, ``1 x kw`` depthwise, 1x1 ``R -> N``.

Children ``pointwise_in`` (no bias), ``vertical`` and ``horizontal`` (depthwise, ``groups=R``,
carrying the height / width parts of stride, padding and dilation) and ``pointwise_out``
(carrying the CP weights and the bias).  The padding split is the one of
:class:`~rankslim.layers.spatial.SpatialConv2d`; the first 1x1 commutes with any padding mode.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedLayerError
from .spatial import split_padding


class CPConv2d(nn.Module):
    """Rank-``R`` CP convolution; ``W[n, c, i, j] = sum_r out[n, r] v[r, i] h[r, j] in[r, c]``."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise UnsupportedLayerError("CP decomposition needs groups == 1")
        ph, pw = split_padding(conv)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        w = conv.weight
        f = dict(device=w.device, dtype=w.dtype)
        self.rank = rank
        self.pointwise_in = nn.Conv2d(conv.in_channels, rank, 1, bias=False, **f)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                                  groups=rank, bias=False, padding_mode=conv.padding_mode, **f)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                                    groups=rank, bias=False, padding_mode=conv.padding_mode, **f)
        self.pointwise_out = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **f)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> "CPConv2d":
        """An (uninitialised) CP layer with ``conv``'s hyper-parameters."""
        return cls(conv, rank)

    @torch.no_grad()
    def set_factors(self, weights: torch.Tensor, out_f: torch.Tensor, in_f: torch.Tensor, vert_f: torch.Tensor,
                    horiz_f: torch.Tensor, bias: torch.Tensor | None) -> "CPConv2d":
        """Load CP factors ``weights: (R,)``, ``out_f: (N, R)``, ``in_f: (C, R)``, ``vert_f: (kh, R)``, ``horiz_f: (kw, R)``."""
        R = self.rank
        self.pointwise_in.weight.copy_(in_f.T.reshape(R, -1, 1, 1))
        self.vertical.weight.copy_(vert_f.T.reshape(R, 1, -1, 1))
        self.horizontal.weight.copy_(horiz_f.T.reshape(R, 1, 1, -1))
        self.pointwise_out.weight.copy_((out_f * weights).reshape(-1, R, 1, 1))
        if bias is not None and self.pointwise_out.bias is not None:
            self.pointwise_out.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_out(self.horizontal(self.vertical(self.pointwise_in(x))))

    # Some modules read their children's ``.weight`` directly (TransformerEncoderLayer's fast path does):
    # expose the dense equivalent, computed on demand and read-only.
    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``(N, C, kh, kw)``."""
        from ..decompose.cp import cp_to_tensor
        out_f = self.pointwise_out.weight[:, :, 0, 0]
        ones = torch.ones(self.rank, dtype=out_f.dtype, device=out_f.device)
        return cp_to_tensor(ones, [out_f, self.pointwise_in.weight[:, :, 0, 0].T, self.vertical.weight[:, 0, :, 0].T,
                                   self.horizontal.weight[:, 0, 0, :].T])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.pointwise_out.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
