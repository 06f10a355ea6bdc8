"""Tensor-Train Linear layer (Novikov et al. 2015): ``y = W x + b`` with ``W`` kept as TT cores.

The forward pass contracts the input with one core at a time and never forms ``W``; the cost
model reads :meth:`TTLinear.rankslim_cost` (exact MACs of that contraction chain).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..cost import Cost


def tt_linear_macs(out_factors: list[int], in_factors: list[int], ranks: list[int]) -> int:
    """MACs for one input vector of the left-to-right core contraction (see :meth:`TTLinear.forward`).

    Step ``k`` contracts ``(M_<k, r_{k-1}, n_k, N_>k)`` with ``G_k: (r_{k-1}, m_k, n_k, r_k)`` over
    ``(r_{k-1}, n_k)``: ``M_<k * N_>k * r_{k-1} * n_k * m_k * r_k`` multiply-adds.
    """
    d = len(in_factors)
    total = 0
    for k in range(d):
        m_before = math.prod(out_factors[:k])
        n_after = math.prod(in_factors[k + 1:])
        total += m_before * n_after * ranks[k] * in_factors[k] * out_factors[k] * ranks[k + 1]
    return int(total)


class TTLinear(nn.Module):
    """Linear layer with ``W: (prod out_factors, prod in_factors)`` in TT format; cores ``(r_{k-1}, m_k, n_k, r_k)``.

    Accepts inputs ``(..., in_features)`` like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, in_factors: list[int], out_factors: list[int],
                 ranks: list[int], bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if math.prod(in_factors) != in_features or math.prod(out_factors) != out_features:
            raise ValueError(f"factors {out_factors} x {in_factors} do not multiply to ({out_features}, {in_features})")
        d = len(in_factors)
        if len(out_factors) != d or len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise ValueError(f"need d={d} out factors and ranks [1, ..., 1] of length {d + 1}, got {out_factors}, {ranks}")
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors, self.ranks = list(in_factors), list(out_factors), list(ranks)
        self.cores = nn.ParameterList([
            nn.Parameter(torch.empty(ranks[k], out_factors[k], in_factors[k], ranks[k + 1], device=device, dtype=dtype))
            for k in range(d)])
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        for c in self.cores:
            nn.init.normal_(c, std=1.0 / math.sqrt(c.shape[0] * c.shape[2]))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def like(cls, linear: nn.Linear, in_factors: list[int], out_factors: list[int], ranks: list[int]) -> "TTLinear":
        """An (uninitialised) TT layer with ``linear``'s sizes, bias, device and dtype."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, in_factors, out_factors, ranks,
                   linear.bias is not None, device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def set_cores(self, cores: list[torch.Tensor], bias: torch.Tensor | None) -> "TTLinear":
        """Load cores ``(r_{k-1}, m_k, n_k, r_k)`` and the bias ``(out,)``."""
        for p, c in zip(self.cores, cores):
            p.copy_(c)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # -1, not a Python int, for the flattened batch: an ONNX export keeps its batch dimension dynamic
        b = -1
        # T: (batch, M_<k, r_{k-1}, n_k, N_>k); starts with M = 1, r_0 = 1
        t = x.reshape(b, 1, 1, self.in_features)
        m_done = 1
        for k, G in enumerate(self.cores):
            n_k = self.in_factors[k]
            n_after = t.shape[-1] // n_k
            t = t.reshape(b, m_done, G.shape[0], n_k, n_after)
            t = torch.einsum("bArnR,rmns->bAmsR", t, G)
            m_done *= self.out_factors[k]
            t = t.reshape(b, m_done, G.shape[3], n_after)
        y = t.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def rankslim_cost(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Cost:
        """Stored numbers (cores + bias) and per-sample MACs (per position, times positions)."""
        positions = int(math.prod(out_shape[:-1]))
        params = sum(c.numel() for c in self.cores) + (0 if self.bias is None else self.bias.numel())
        return Cost(int(params), positions * tt_linear_macs(self.out_factors, self.in_factors, self.ranks))

    def weight_matrix(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (for checks only; the forward pass never builds it)."""
        from ..decompose.tt import tt_to_matrix
        return tt_to_matrix(list(self.cores))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight, for modules that read ``.weight`` (the forward pass never uses it)."""
        return self.weight_matrix()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_factors={self.in_factors}, out_factors={self.out_factors}, ranks={self.ranks}")
