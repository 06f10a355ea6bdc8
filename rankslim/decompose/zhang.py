"""Data-aware low rank in closed form (Zhang et al. 2015; GreBdec eq. 3 with S = 0).

Problem (regularised towards the original weights by ``λ``)::

    min_L  1/(2n) ‖Y − L X‖_F² + λ/2 ‖W − L‖_F²   s.t. rank(L) ≤ r

With ``A = XXᵀ/n + λI`` and ``B = YXᵀ/n + λW`` the objective is ``½‖(L − B A⁻¹) A^{1/2}‖² + const``,
so the minimiser is the truncated *generalised* SVD ``L = [B A^{-1/2}]_r A^{-1/2}`` (Takane &
Hunter; ``[·]_r`` = best rank-r approximation, Eckart-Young).  ``λ`` is the explicit damping that
keeps ``A`` invertible when ``XXᵀ`` is singular (dead ReLU channels, zero padding): ``λ =
damping · σ_max(XXᵀ/n)``.  With ``λ = 0`` and ``Y = W X`` this is Zhang et al.'s asymmetric
reconstruction; with white inputs (``XXᵀ ∝ I``) it reduces to the plain truncated SVD of ``W``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankError
# re-exported under its historical name: methods.base imports it from here
from ..linalg import psd_inv_sqrt
from ..linalg import psd_sqrt_inv_sqrt as sqrt_and_inv_sqrt
from .prune import DataTerms


@dataclass
class GSVDFactors:
    """``L = U @ V`` with ``U: (m, r)``, ``V: (r, k)``; ``sigma`` the generalised singular values kept."""

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor


def truncated_gsvd(B: torch.Tensor, A: torch.Tensor, rank: int, A_isqrt: torch.Tensor | None = None) -> GSVDFactors:
    """Minimiser of ``‖(L − B A⁻¹) A^{1/2}‖_F`` over rank-``rank`` ``L`` (``B: (m, k)``, SPD ``A: (k, k)``).

    ``L = [B A^{-1/2}]_r A^{-1/2}``; returns balanced factors ``U = U_r Σ_r^{1/2}``,
    ``V = Σ_r^{1/2} V_rᵀ A^{-1/2}``.  Pass a precomputed ``A_isqrt`` to avoid the ``eigh``.
    """
    m, k = B.shape
    if not 1 <= rank <= min(m, k):
        raise RankError(f"rank {rank} is impossible for a {m}x{k} matrix: use 1..{min(m, k)}")
    if A_isqrt is None:
        A_isqrt = psd_inv_sqrt(A)
    Z = B.to(torch.float64) @ A_isqrt
    Uz, s, Vh = torch.linalg.svd(Z, full_matrices=False)
    root = s[:rank].sqrt()
    U = Uz[:, :rank] * root
    V = (root[:, None] * Vh[:rank]) @ A_isqrt
    return GSVDFactors(U, V, s[:rank])


@dataclass
class ZhangResult:
    """Factors ``U: (m, r)``, ``V: (r, k)``, the objective (data term + damping term), the damping λ,
    the relative output error ``‖Y − LX‖²/‖Y‖²`` (``None`` when ``yy`` was not given) and that of the
    plain truncated SVD at the same rank (for comparison)."""

    U: torch.Tensor
    V: torch.Tensor
    objective: float
    lam: float
    relative_error: float | None
    svd_relative_error: float | None


def zhang_lowrank(W: torch.Tensor, XX: torch.Tensor, YX: torch.Tensor, n: int, rank: int, *, yy: float = 0.0,
                  damping: float = 1e-4, generator: torch.Generator | None = None) -> ZhangResult:
    """Data-aware rank-``rank`` approximation of ``W: (m, k)`` from calibration sums.

    ``XX: (k, k)`` = Σ x xᵀ, ``YX: (m, k)`` = Σ y xᵀ over ``n`` columns, ``yy`` = Σ‖y‖² (optional,
    used only for the reported errors); ``damping``: λ = damping·σ_max(XX/n) (≥ 0).
    """
    if damping < 0:
        raise RankError(f"damping must be >= 0, got {damping}")
    terms = DataTerms.build(W, XX, YX, n, None, yy, lam=None, generator=generator)
    if damping > 0:
        smax = terms.smax
        del terms  # its k x k float64 terms would stay alive while the damped ones are built
        terms = DataTerms.build(W, XX, YX, n, None, yy, lam=damping * smax, generator=generator)
    f = truncated_gsvd(terms.N, terms.A, rank)
    L = f.U @ f.V
    obj = terms.objective(L)
    rel = svd_rel = None
    if yy > 0:
        data = lambda Wh: float(yy / n - 2 * (Wh * terms.Myx).sum() + ((Wh @ terms.Cxx) * Wh).sum())  # noqa: E731
        rel = data(L) / (yy / n)
        Us, s, Vh = torch.linalg.svd(terms.W, full_matrices=False)
        svd_rel = data((Us[:, :rank] * s[:rank]) @ Vh[:rank]) / (yy / n)
    return ZhangResult(f.U, f.V, obj, terms.lam, rel, svd_rel)


__all__ = ["truncated_gsvd", "zhang_lowrank", "sqrt_and_inv_sqrt", "GSVDFactors", "ZhangResult"]
