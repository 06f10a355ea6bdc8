"""Tucker-2 (and Tucker-1) decomposition of a conv kernel: Kim et al. (ICLR 2016).

For a kernel ``K: (N, C, kh, kw)`` (PyTorch order: out, in, height, width) the Tucker-2 form
keeps the two spatial modes and compresses the two channel modes:

    K[t, s, i, j] = sum_{r3, r4} C[r4, r3, i, j] U3[s, r3] U4[t, r4]

with ``U3: (C, R3)`` and ``U4: (N, R4)`` orthonormal and the core ``C: (R4, R3, kh, kw)``.
The convolution becomes 1x1 (C -> R3, weights ``U3^T``), kh x kw (R3 -> R4, the core, with the
original stride / padding / dilation) and 1x1 (R4 -> N, weights ``U4``, plus the bias).

Factors: truncated HOSVD (``U3`` = leading left singular vectors of the mode-C unfolding
``(C, N kh kw)``, ``U4`` of the mode-N unfolding ``(N, C kh kw)``), optionally refined by HOOI
(alternating projections, De Lathauwer et al. 2000).  Tucker-1 (``R3 = None``) compresses only
the output mode, which is what Kim et al. do for the first layer (few input channels) and what a
1x1 convolution reduces to.  Ranks may be chosen by EVBMF on the two unfoldings, as Kim et al. do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankError
from ..linalg import gram_svd
from .evbmf import evbmf


@dataclass
class TuckerFactors:
    """``core: (R4, R3, kh, kw)`` (or ``(R4, C, kh, kw)`` for Tucker-1), ``U_in: (C, R3) | None``, ``U_out: (N, R4)``.

    ``n_iter``: HOOI sweeps actually run; ``rel_error``: ``||K - K_hat||_F / ||K||_F``.
    """

    core: torch.Tensor
    U_in: torch.Tensor | None
    U_out: torch.Tensor
    n_iter: int = 0
    rel_error: float = float("nan")

    @property
    def ranks(self) -> tuple[int | None, int]:
        return (None if self.U_in is None else int(self.U_in.shape[1]), int(self.U_out.shape[1]))


def unfold_out(K: torch.Tensor) -> torch.Tensor:
    """Mode-N (output channel) unfolding of ``K: (N, C, kh, kw)``: ``(N, C kh kw)``."""
    return K.reshape(K.shape[0], -1)


def unfold_in(K: torch.Tensor) -> torch.Tensor:
    """Mode-C (input channel) unfolding of ``K: (N, C, kh, kw)``: ``(C, N kh kw)``."""
    return K.transpose(0, 1).reshape(K.shape[1], -1)


def _leading_left(M: torch.Tensor, r: int) -> torch.Tensor:
    """Leading ``r`` left singular vectors of ``M: (m, n)`` (via the ``m x m`` Gram matrix when ``n`` >> ``m``)."""
    m, n = M.shape
    if n > 4 * m:
        # eigh of M M^T is far cheaper for the wide unfoldings of big kernels (e.g. 512 x 4608)
        return gram_svd(M, r, right=False)[0]
    # a rank above min(m, n) still needs r orthonormal columns (the extra ones span nothing of M)
    U, _, _ = torch.linalg.svd(M, full_matrices=r > min(m, n))
    return U[:, :r]


def tucker_core(K: torch.Tensor, U_in: torch.Tensor | None, U_out: torch.Tensor) -> torch.Tensor:
    """Project ``K: (N, C, kh, kw)`` on the factors: ``core = K x_N U_out^T x_C U_in^T``."""
    core = torch.einsum("ncij,nr->rcij", K, U_out)
    if U_in is not None:
        core = torch.einsum("rcij,cs->rsij", core, U_in)
    return core


def tucker_reconstruct(f: TuckerFactors) -> torch.Tensor:
    """Kernel ``(N, C, kh, kw)`` represented by the factors."""
    K = torch.einsum("rsij,nr->nsij", f.core, f.U_out)
    if f.U_in is not None:
        K = torch.einsum("nsij,cs->ncij", K, f.U_in)
    return K


def _check_ranks(shape: tuple[int, ...], ranks: tuple[int | None, int]) -> None:
    N, C = shape[0], shape[1]
    r3, r4 = ranks
    if not 1 <= r4 <= N:
        raise RankError(f"Tucker output rank R4={r4} is impossible for a kernel with {N} output channels: use [1, {N}]")
    if r3 is not None and not 1 <= r3 <= C:
        raise RankError(f"Tucker input rank R3={r3} is impossible for a kernel with {C} input channels: use [1, {C}]")


def tucker2(K: torch.Tensor, ranks: tuple[int | None, int], n_iter: int = 0, tol: float = 1e-10) -> TuckerFactors:
    """Tucker-2 (``ranks = (R3, R4)``) or Tucker-1 (``ranks = (None, R4)``) of ``K: (N, C, kh, kw)``.

    HOSVD initialisation, then up to ``n_iter`` HOOI sweeps (stopping when the relative error
    improves by less than ``tol``).  Computed in float64, returned in ``K``'s dtype.
    Raises :class:`RankError` for ranks outside ``[1, C]`` / ``[1, N]``.
    """
    if K.dim() != 4:
        raise ValueError(f"expected a conv kernel (N, C, kh, kw), got shape {tuple(K.shape)}")
    _check_ranks(tuple(K.shape), ranks)
    r3, r4 = ranks
    K64 = K.detach().to(torch.float64)
    norm = float(torch.linalg.norm(K64)) or 1.0
    U_out = _leading_left(unfold_out(K64), r4)
    U_in = None if r3 is None else _leading_left(unfold_in(K64), r3)
    sweeps = 0
    if r3 is not None and n_iter > 0:
        prev = float("inf")
        for sweeps in range(1, n_iter + 1):
            # HOOI: each factor is the dominant subspace of K projected on the other factor
            U_in = _leading_left(unfold_in(torch.einsum("ncij,nr->rcij", K64, U_out)), r3)
            U_out = _leading_left(unfold_out(torch.einsum("ncij,cs->nsij", K64, U_in)), r4)
            # with orthonormal factors ||K - K_hat||^2 = ||K||^2 - ||core||^2
            err = max(norm ** 2 - float(tucker_core(K64, U_in, U_out).square().sum()), 0.0) ** 0.5
            if prev - err < tol * norm:
                break
            prev = err
    core = tucker_core(K64, U_in, U_out)
    f64 = TuckerFactors(core, U_in, U_out, sweeps)
    rel = float(torch.linalg.norm(K64 - tucker_reconstruct(f64)) / norm)
    dt = K.dtype
    return TuckerFactors(core.to(dt).contiguous(), None if U_in is None else U_in.to(dt).contiguous(),
                         U_out.to(dt).contiguous(), sweeps, rel)


def evbmf_tucker_ranks(K: torch.Tensor, tucker1: bool = False) -> tuple[int | None, int]:
    """Kim et al.'s rank rule: EVBMF rank of the mode-C and mode-N unfoldings of ``K: (N, C, kh, kw)``.

    Each rank is clipped to at least 1 (EVBMF may call a whole unfolding noise).  With
    ``tucker1`` only the output rank is estimated and ``R3`` is ``None``.
    """
    K64 = K.detach().to(torch.float64)
    r4 = max(1, evbmf(unfold_out(K64)).rank)
    r3 = None if tucker1 else max(1, evbmf(unfold_in(K64)).rank)
    return r3, r4


__all__ = ["TuckerFactors", "tucker2", "tucker_core", "tucker_reconstruct", "unfold_in", "unfold_out",
           "evbmf_tucker_ranks"]
