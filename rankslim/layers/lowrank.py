"""Low-rank Linear (x -> V -> U) and channel-decomposed Conv2d (k x k conv to r channels, then 1 x 1).

Both are made of plain ``nn.Linear`` / ``nn.Conv2d`` children, so the cost model, ONNX export
and ``torch.save`` treat them like any other module.
"""
from __future__ import annotations

import torch
from torch import nn


def _keep_off_fused_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook.  Its presence is the point: ``nn.TransformerEncoderLayer`` skips its fused
    fast path when any submodule has hooks, and that path would read ``.weight`` (rebuilding the dense
    matrix on every call) instead of calling the low-rank layer."""
    return None


class LowRankLinear(nn.Module):
    """``y = U (V x) + b`` with ``V: (rank, in)`` (child ``first``) and ``U: (out, rank)`` (child ``second``).

    Inside an ``nn.TransformerEncoderLayer`` the layer keeps the encoder off PyTorch's fused fast path
    (see :func:`_keep_off_fused_path`), so it runs at low-rank cost.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.register_forward_pre_hook(_keep_off_fused_path)

    @classmethod
    def like(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """An (uninitialised) low-rank layer with ``linear``'s sizes, bias, device and dtype."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                   device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Load ``U: (out, rank)``, ``V: (rank, in)`` and the bias ``(out,)``."""
        self.second.weight.copy_(U)
        self.first.weight.copy_(V)
        if bias is not None and self.second.bias is not None:
            self.second.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    # Some modules read their children's ``.weight``/``.bias`` directly (TransformerEncoderLayer's
    # fast path does), so the dense equivalents are exposed, computed on demand and read-only.
    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``U @ V``: ``(out, in)``."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """Channel decomposition: ``k x k`` conv ``C -> rank`` (child ``first``) then ``1 x 1`` conv ``rank -> N``.

    The first conv keeps stride, padding, dilation and padding_mode of the original; the bias
    moves to the 1 x 1 conv.  In the im2col view ``W: (N, C*kh*kw) ≈ U (N, r) @ V (r, C*kh*kw)``.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("channel decomposition needs groups == 1")
        self.rank = rank
        w = conv.weight
        self.first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, bias=False,
                               padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None,
                                device=w.device, dtype=w.dtype)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """An (uninitialised) channel-decomposed layer with ``conv``'s hyper-parameters."""
        return cls(conv, rank)

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> "LowRankConv2d":
        """Load ``U: (N, rank)``, ``V: (rank, C*kh*kw)`` and the bias ``(N,)``."""
        self.second.weight.copy_(U.reshape(self.second.weight.shape))
        self.first.weight.copy_(V.reshape(self.first.weight.shape))
        if bias is not None and self.second.bias is not None:
            self.second.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``(N, C, kh, kw)``."""
        u = self.second.weight.flatten(1)
        return (u @ self.first.weight.flatten(1)).reshape(u.shape[0], *self.first.weight.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
