"""Tensor-Train (TT) matrix format for fully-connected weights: Novikov et al. (NeurIPS 2015).

A weight ``W: (out, in)`` with ``out = m_1 ... m_d`` and ``in = n_1 ... n_d`` is viewed as the
tensor ``W[(i_1..i_d), (j_1..j_d)]`` (row-major multi-indices) and written as

    W[i_1..i_d; j_1..j_d] = G_1[i_1, j_1] G_2[i_2, j_2] ... G_d[i_d, j_d]

with cores ``G_k: (r_{k-1}, m_k, n_k, r_k)`` and ``r_0 = r_d = 1`` (lecture, "Low Rank
Approximation for FC").  The cores come from TT-SVD (Oseledets 2011, Alg. 1) on the tensor with
merged mode pairs ``(m_k n_k)``: successive truncated SVDs of the unfoldings.  At the full
TT-ranks ``r_k = min(prod_{l<=k} m_l n_l, prod_{l>k} m_l n_l)`` the representation is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RankError


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n >= 1`` in ascending order (``[]`` for 1)."""
    if n < 1:
        raise ValueError(f"expected a positive integer, got {n}")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize_size(n: int, d: int) -> list[int]:
    """Split ``n`` into ``d`` integer factors as equal as possible (product exactly ``n``), descending.

    Greedy: the largest prime factors go, one by one, to the currently smallest bin.  Sizes with
    fewer than ``d`` prime factors are padded with 1s (a mode of size 1).
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    bins = [1] * d
    for p in sorted(prime_factors(n), reverse=True):
        i = min(range(d), key=lambda j: bins[j])
        bins[i] *= p
    return sorted(bins, reverse=True)


def tt_full_ranks(out_factors: list[int], in_factors: list[int]) -> list[int]:
    """The exact TT-ranks ``[1, r_1, ..., r_{d-1}, 1]`` of a generic matrix with these mode sizes."""
    sizes = [m * n for m, n in zip(out_factors, in_factors)]
    d = len(sizes)
    ranks = [1]
    for k in range(1, d):
        ranks.append(min(math.prod(sizes[:k]), math.prod(sizes[k:])))
    return ranks + [1]


@dataclass
class TTMatrix:
    """TT cores ``cores[k]: (r_{k-1}, m_k, n_k, r_k)`` of a matrix ``(prod m, prod n)``; ``rel_error`` of the fit."""

    cores: list[torch.Tensor]
    rel_error: float = float("nan")

    @property
    def ranks(self) -> list[int]:
        return [int(self.cores[0].shape[0])] + [int(c.shape[3]) for c in self.cores]

    @property
    def out_factors(self) -> list[int]:
        return [int(c.shape[1]) for c in self.cores]

    @property
    def in_factors(self) -> list[int]:
        return [int(c.shape[2]) for c in self.cores]


def _check(W: torch.Tensor, out_factors: list[int], in_factors: list[int]) -> None:
    if W.dim() != 2:
        raise ValueError(f"TT-matrix needs a 2-D weight, got shape {tuple(W.shape)}")
    if len(out_factors) != len(in_factors):
        raise ValueError("out_factors and in_factors must have the same length d")
    if math.prod(out_factors) != W.shape[0] or math.prod(in_factors) != W.shape[1]:
        raise ValueError(f"factors {out_factors} x {in_factors} do not multiply to the weight shape {tuple(W.shape)}")


def tt_svd_matrix(W: torch.Tensor, out_factors: list[int], in_factors: list[int],
                  ranks: list[int] | int) -> TTMatrix:
    """TT-SVD of ``W: (out, in)`` into ``d = len(out_factors)`` cores with TT-ranks at most ``ranks``.

    ``ranks``: an int (every inner rank, clipped to the full ranks) or ``[1, r_1, ..., r_{d-1}, 1]``.
    Computed in float64 (sequential truncated SVDs, left to right), returned in ``W``'s dtype.
    Raises :class:`RankError` for ranks < 1 or above the full TT-ranks.
    """
    _check(W, out_factors, in_factors)
    d = len(out_factors)
    full = tt_full_ranks(out_factors, in_factors)
    if isinstance(ranks, int):
        if ranks < 1:
            raise RankError(f"TT-rank must be >= 1, got {ranks}")
        ranks = [1] + [min(ranks, f) for f in full[1:-1]] + [1]
    ranks = list(ranks)
    if len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
        raise RankError(f"TT-ranks must be a list [1, r_1, ..., r_{d - 1}, 1] of length {d + 1}, got {ranks}")
    for k in range(1, d):
        if not 1 <= ranks[k] <= full[k]:
            raise RankError(f"TT-rank r_{k}={ranks[k]} is impossible: it must lie in [1, {full[k]}] for modes "
                            f"{out_factors} x {in_factors}")
    W64 = W.detach().to(torch.float64)
    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, m_2, n_2, ...) so each core sees one (m_k, n_k) pair
    T = W64.reshape(*out_factors, *in_factors)
    perm = [p for k in range(d) for p in (k, d + k)]
    T = T.permute(*perm).contiguous()
    cores = []
    rest = T.reshape(1, -1)
    for k in range(d - 1):
        m, n = out_factors[k], in_factors[k]
        mat = rest.reshape(ranks[k] * m * n, -1)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        r = ranks[k + 1]
        cores.append(U[:, :r].reshape(ranks[k], m, n, r))
        rest = S[:r, None] * Vh[:r]
    cores.append(rest.reshape(ranks[d - 1], out_factors[-1], in_factors[-1], 1))
    approx = tt_to_matrix(cores)
    rel = float(torch.linalg.norm(W64 - approx) / (torch.linalg.norm(W64) or 1.0))
    return TTMatrix([c.to(W.dtype).contiguous() for c in cores], rel)


def tt_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense ``(prod m_k, prod n_k)`` matrix of TT cores ``(r_{k-1}, m_k, n_k, r_k)`` (for tests and errors)."""
    full = cores[0]  # (1, M, N, r)
    for G in cores[1:]:
        r0, M, N, _ = full.shape
        _, m, n, r = G.shape
        full = torch.einsum("aMNr,rmns->aMmNns", full, G).reshape(r0, M * m, N * n, r)
    return full[0, :, :, 0]


def tt_singular_values(W: torch.Tensor, out_factors: list[int], in_factors: list[int]) -> torch.Tensor:
    """Singular values (float64, descending) of the TT unfolding with the largest full rank.

    For TT with one shared rank knob this bond is the last to saturate; its spectrum is a
    natural per-knob importance for energy-based allocation.
    """
    _check(W, out_factors, in_factors)
    d = len(out_factors)
    full = tt_full_ranks(out_factors, in_factors)
    k = max(range(1, d), key=lambda j: full[j]) if d > 1 else 1
    T = W.detach().to(torch.float64).reshape(*out_factors, *in_factors)
    perm = [p for j in range(d) for p in (j, d + j)]
    T = T.permute(*perm).contiguous()
    left = math.prod(out_factors[j] * in_factors[j] for j in range(k))
    return torch.linalg.svdvals(T.reshape(left, -1))


__all__ = ["TTMatrix", "factorize_size", "prime_factors", "tt_full_ranks", "tt_svd_matrix", "tt_to_matrix",
           "tt_singular_values"]
