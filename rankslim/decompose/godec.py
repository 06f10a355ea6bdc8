"""GoDec (Zhou & Tao 2011): ``W ≈ L + S``, ``rank(L) ≤ r``, ``card(S) ≤ c`` — data-free (GreBdec's naive model).

Alternating minimisation of ``‖W − L − S‖_F²``:

* L-step: best rank-r approximation of ``W − S``.  GoDec replaces the SVD by a bilateral random
  projection (BRP) with ``power`` iterations: starting from a Gaussian ``Y₂``, repeat
  ``Y₁ = M Y₂, Y₂ = Mᵀ Y₁``, then ``Q = qr(Y₂)``, ``L = (M Q) Qᵀ`` (the published GoDec code).
  ``exact=True`` uses the truncated SVD instead, which makes every L-step optimal and the
  objective monotone.
* S-step: ``S = P_Ω(W − L)``, the ``c`` largest-magnitude entries (optimal for fixed L).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankError
from ..linalg import range_finder
from .prune import hard_threshold


@dataclass
class GoDecResult:
    """``W ≈ U @ V + S`` with ``U: (m, r)``, ``V: (r, k)``, ``S: (m, k)`` zero outside ``mask``;
    ``objective`` = ‖W − UV − S‖_F² after every iteration; ``iterations`` run."""

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    objective: list[float]
    iterations: int


def brp_lowrank(M: torch.Tensor, rank: int, power: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilateral random projection rank-``rank`` approximation of ``M: (m, k)`` as ``(M Q, Qᵀ)``."""
    # Y₂ = (MᵀM)^(power+1) Ω: 2(power + 1) products, no re-orthogonalisation (the published GoDec code)
    Q = range_finder(M, rank, passes=2 * (power + 1), generator=generator, reorthogonalize=False)
    return M @ Q, Q.T


def godec(W: torch.Tensor, rank: int, card: int, *, iters: int = 100, tol: float = 1e-7, power: int = 2,
          exact: bool = False, generator: torch.Generator | None = None) -> GoDecResult:
    """GoDec decomposition of ``W: (m, k)`` into rank ``rank`` plus ``card`` non-zeros (float64 inside).

    Stops after ``iters`` iterations or when the objective changes by less than ``tol`` (relative).
    ``power``: BRP power iterations; ``exact``: truncated SVD L-step (monotone objective).
    """
    W = W.to(torch.float64)
    m, k = W.shape
    if not 0 <= rank <= min(m, k):
        raise RankError(f"rank {rank} is impossible for a {m}x{k} matrix: use 0..{min(m, k)}")
    if card < 0:
        raise RankError(f"cardinality must be >= 0, got {card}")
    gen = generator or torch.Generator().manual_seed(0)
    S = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    U = W.new_zeros(m, rank)
    V = W.new_zeros(rank, k)
    obj: list[float] = []
    it = 0
    for it in range(1, iters + 1):
        M = W - S
        if rank > 0:
            if exact:
                Uz, s, Vh = torch.linalg.svd(M, full_matrices=False)
                U, V = Uz[:, :rank] * s[:rank], Vh[:rank]
            else:
                U, V = brp_lowrank(M, rank, power, gen)
        L = U @ V
        S, mask = hard_threshold(W - L, card)
        obj.append(float(((W - L - S) ** 2).sum()))
        if len(obj) > 1 and abs(obj[-2] - obj[-1]) <= tol * max(obj[-1], 1e-300):
            break
        if obj[-1] <= 1e-28 * max(float((W * W).sum()), 1e-300):
            break
    return GoDecResult(U, V, S, mask, obj, it)


__all__ = ["godec", "brp_lowrank", "GoDecResult"]
