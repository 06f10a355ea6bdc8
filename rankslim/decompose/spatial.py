"""Spatial (vertical x horizontal) separation of a conv kernel: Tai et al. (ICLR 2016), closed form.

Jaderberg et al. (BMVC 2014, scheme 2) replace a ``k x k`` convolution by a ``k x 1`` convolution
to ``K`` channels followed by a ``1 x k`` convolution.  Tai et al. show that the weights minimising

    E(H, V) = sum_{n, c} || W_n^c - sum_{k=1}^K H_n^k (V_k^c)^T ||_F^2

come from the SVD of the rearranged kernel ``T[W]: (C * kh, kw * N)`` with
``T[W][(c, i), (n, j)] = W[n, c, i, j]`` (lecture theorem, with ``j_1 = (c - 1) kh + i`` and
``j_2 = (n - 1) kw + j``): if ``T[W] = U D Q^T`` then

    V_k^c(i) = U[(c, i), k] sqrt(D_kk)        (vertical filter, k x 1)
    H_n^k(j) = Q[(n, j), k] sqrt(D_kk)        (horizontal filter, 1 x k)

The rank ``K`` ranges over ``[1, min(C * kh, N * kw)]``; at the upper end the separation is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankError


@dataclass
class SpatialFactors:
    """``vertical: (K, C, kh, 1)`` and ``horizontal: (N, K, 1, kw)`` conv weights of a rank-``K`` separation."""

    vertical: torch.Tensor
    horizontal: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])


def spatial_matrix(W: torch.Tensor) -> torch.Tensor:
    """Tai et al.'s rearrangement of a kernel ``W: (N, C, kh, kw)`` into ``(C * kh, N * kw)``."""
    if W.dim() != 4:
        raise ValueError(f"expected a conv kernel (N, C, kh, kw), got shape {tuple(W.shape)}")
    N, C, kh, kw = W.shape
    # rows (c, i) with i fastest, columns (n, j) with j fastest
    return W.permute(1, 2, 0, 3).reshape(C * kh, N * kw)


def spatial_max_rank(shape: tuple[int, int, int, int]) -> int:
    """Largest useful separation rank of a ``(N, C, kh, kw)`` kernel: ``min(C * kh, N * kw)``."""
    N, C, kh, kw = shape
    return min(C * kh, N * kw)


def spatial_singular_values(W: torch.Tensor) -> torch.Tensor:
    """Descending singular values (float64) of :func:`spatial_matrix` of ``W``; squared tail = rank-K error."""
    return torch.linalg.svdvals(spatial_matrix(W.detach().to(torch.float64)))


def spatial_separation(W: torch.Tensor, rank: int) -> SpatialFactors:
    """Best rank-``rank`` vertical/horizontal separation of ``W: (N, C, kh, kw)`` (float64 SVD).

    Returns factors in ``W``'s dtype.  Raises :class:`RankError` outside ``[1, min(C kh, N kw)]``.
    """
    N, C, kh, kw = W.shape
    kmax = spatial_max_rank(tuple(W.shape))
    if not 1 <= rank <= kmax:
        raise RankError(f"spatial rank {rank} is impossible for a {N}x{C}x{kh}x{kw} kernel: "
                        f"it must lie in [1, {kmax}] (= min(C*kh, N*kw))")
    M = spatial_matrix(W.detach().to(torch.float64))
    U, S, Qh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    Vr = U[:, :rank] * root                     # (C*kh, K)
    Hr = Qh[:rank].T * root                     # (N*kw, K)
    vertical = Vr.T.reshape(rank, C, kh, 1)
    horizontal = Hr.reshape(N, kw, rank).permute(0, 2, 1).reshape(N, rank, 1, kw)
    return SpatialFactors(vertical.to(W.dtype).contiguous(), horizontal.to(W.dtype).contiguous())


def spatial_reconstruct(f: SpatialFactors) -> torch.Tensor:
    """The kernel ``(N, C, kh, kw)`` that the separated pair computes: ``sum_k H[n,k,j] V[k,c,i]``."""
    return torch.einsum("nkj,kci->ncij", f.horizontal[:, :, 0, :], f.vertical[:, :, :, 0])


__all__ = ["SpatialFactors", "spatial_matrix", "spatial_max_rank", "spatial_singular_values",
           "spatial_separation", "spatial_reconstruct"]
