"""Tucker-2 / Tucker-1 convolution (Kim et al. 2016): 1x1 ``C -> R3``, ``kh x kw`` ``R3 -> R4``, 1x1 ``R4 -> N``.

Children: ``first`` (1x1, no bias; absent for Tucker-1), ``core`` (keeps the original stride,
padding, dilation and padding_mode — any padding mode commutes with a pointwise map) and
``last`` (1x1, carrying the bias).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedLayerError


class TuckerConv2d(nn.Module):
    """``[1x1 C->R3] -> kh x kw R3->R4 -> 1x1 R4->N``; ``ranks = (R3, R4)``, ``R3 = None`` for Tucker-1."""

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int | None, int]) -> None:
        super().__init__()
        if conv.groups != 1:
            raise UnsupportedLayerError("Tucker decomposition needs groups == 1")
        r3, r4 = ranks
        self.ranks = (None if r3 is None else int(r3), int(r4))
        w = conv.weight
        kw = dict(device=w.device, dtype=w.dtype)
        c_mid = conv.in_channels if r3 is None else r3
        self.first = None if r3 is None else nn.Conv2d(conv.in_channels, r3, 1, bias=False, **kw)
        self.core = nn.Conv2d(c_mid, r4, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
        self.last = nn.Conv2d(r4, conv.out_channels, 1, bias=conv.bias is not None, **kw)

    @classmethod
    def like(cls, conv: nn.Conv2d, ranks: tuple[int | None, int]) -> "TuckerConv2d":
        """An (uninitialised) Tucker layer with ``conv``'s hyper-parameters."""
        return cls(conv, ranks)

    @torch.no_grad()
    def set_factors(self, core: torch.Tensor, U_in: torch.Tensor | None, U_out: torch.Tensor,
                    bias: torch.Tensor | None) -> "TuckerConv2d":
        """Load ``core: (R4, R3, kh, kw)``, ``U_in: (C, R3)`` (or ``None``), ``U_out: (N, R4)`` and the bias."""
        if (U_in is None) != (self.first is None):
            raise ValueError("U_in must be given exactly when the layer has a first 1x1 conv (Tucker-2)")
        if self.first is not None:
            self.first.weight.copy_(U_in.T.reshape(self.first.weight.shape))
        self.core.weight.copy_(core)
        self.last.weight.copy_(U_out.reshape(self.last.weight.shape))
        if bias is not None and self.last.bias is not None:
            self.last.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            x = self.first(x)
        return self.last(self.core(x))

    # Some modules read their children's ``.weight`` directly (TransformerEncoderLayer's fast path does):
    # expose the dense equivalent, computed on demand and read-only.
    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``(N, C, kh, kw)``."""
        k = torch.einsum("rsij,nr->nsij", self.core.weight, self.last.weight[:, :, 0, 0])
        if self.first is not None:
            k = torch.einsum("nsij,sc->ncij", k, self.first.weight[:, :, 0, 0])
        return k

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"
