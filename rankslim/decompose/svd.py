"""Truncated SVD, exact or randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

The GreBdec paper's section 3 notes that SVD is the special case of W = L + S with S = 0 and
data-independent reconstruction: ``min ||W - L||_F s.t. rank(L) <= r`` is solved by keeping the
``r`` largest singular triplets (Eckart-Young).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankError
from ..linalg import gram_svd, range_finder

#: Matrices with at least this many entries avoid LAPACK's full SVD, which is the slow part
#: (``svdvals`` of a 4096 x 25088 matrix: ~80 s on two cores).  Small ranks (under
#: ``RANDOMIZED_MAX_RANK_FRACTION`` of the smaller side) use the randomized range finder; other
#: ranks use the eigendecomposition of the smaller Gram matrix in float64 (~15 s for the same
#: matrix).  The Gram route squares the condition number, so singular values below ~1e-8 of
#: the largest lose relative accuracy; truncation never keeps those.
LARGE_MIN_ENTRIES = 2_000_000
RANDOMIZED_MAX_RANK_FRACTION = 0.1


@dataclass
class LowRankFactors:
    """``W ≈ U @ V`` with ``U: (m, r)`` and ``V: (r, n)``; singular values split as sqrt on both sides.

    ``solver`` says which algorithm produced them ("exact" or "randomized").
    """

    U: torch.Tensor
    V: torch.Tensor
    solver: str

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


SOLVERS = ("auto", "exact", "gram", "randomized")


def choose_solver(shape: tuple[int, int], rank: int, solver: str = "auto") -> str:
    """Pick "exact", "gram" or "randomized" for a ``shape`` matrix truncated to ``rank``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver
    m, n = shape
    if m * n < LARGE_MIN_ENTRIES:
        return "exact"
    return "randomized" if rank < RANDOMIZED_MAX_RANK_FRACTION * min(m, n) else "gram"


def randomized_svd(
    W: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``W: (m, n)``: returns ``U: (m, rank)``, ``S: (rank,)``, ``Vh: (rank, n)``.

    :func:`~rankslim.linalg.range_finder` with ``n_iter`` QR-stabilised power iterations and
    ``oversample`` extra columns, then the exact SVD of the small projected matrix.
    """
    m, n = W.shape
    Q = range_finder(W, min(rank + oversample, m, n), passes=2 * n_iter + 1, generator=generator)
    B = Q.T @ W
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def truncated_svd(
    W: torch.Tensor, rank: int, solver: str = "auto", generator: torch.Generator | None = None
) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``W: (m, n)`` as ``U: (m, r) @ V: (r, n)``.

    Computed in float64 for accuracy and returned in ``W``'s dtype.
    Raises :class:`RankError` if ``rank`` is not in ``[1, min(m, n)]``.
    """
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise RankError(f"rank {rank} is impossible for a {m}x{n} matrix: it must lie in [1, {min(m, n)}]")
    used = choose_solver((m, n), rank, solver)
    W64 = W.detach().to(torch.float64)
    if used == "randomized":
        U, S, Vh = randomized_svd(W64, rank, generator=generator)
    elif used == "gram":
        U, S, Vh = gram_svd(W64, rank)
    else:
        U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    root = S.sqrt()
    return LowRankFactors((U * root).to(W.dtype), (root[:, None] * Vh).to(W.dtype), used)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values of ``W: (m, n)`` in descending order, float64, shape ``(min(m, n),)``.

    Large matrices (see :data:`LARGE_MIN_ENTRIES`) go through the smaller Gram matrix.
    """
    W64 = W.detach().to(torch.float64)
    m, n = W64.shape
    if m * n < LARGE_MIN_ENTRIES:
        return torch.linalg.svdvals(W64)
    return gram_svd(W64, left=False, right=False)[1]


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(sigma[:r]**2) >= energy * sum(sigma**2)`` (at least 1).

    ``sigma``: descending singular values ``(k,)``; ``energy`` in ``[0, 1]``.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must lie in [0, 1], got {energy}")
    e = sigma.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # tolerance so that energy=1.0 does not overshoot through rounding
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(r, sigma.numel()))


__all__ = ["LowRankFactors", "SOLVERS", "choose_solver", "gram_svd", "randomized_svd", "truncated_svd",
           "singular_values", "energy_rank", "LARGE_MIN_ENTRIES", "RANDOMIZED_MAX_RANK_FRACTION"]
