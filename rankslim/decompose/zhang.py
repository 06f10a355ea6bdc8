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
from ..linalg import PSDFactor, gram_svd, psd_factor
from .prune import sigma_max_psd


@dataclass
class GSVDFactors:
    """``L = U @ V`` with ``U: (m, r)``, ``V: (r, k)``; ``sigma`` the generalised singular values kept
    (``‖L F‖² = Σ sigma²`` for the factor ``F`` of ``A``)."""

    U: torch.Tensor
    V: torch.Tensor
    sigma: torch.Tensor


def truncated_gsvd(B: torch.Tensor, A: torch.Tensor | None, rank: int, factor: PSDFactor | None = None,
                   overwrite: bool = False) -> GSVDFactors:
    """Minimiser of ``‖(L − B A⁻¹) A^{1/2}‖_F`` over rank-``rank`` ``L`` (``B: (m, k)``, SPD ``A: (k, k)``).

    ``L = [B A^{-1/2}]_r A^{-1/2}``, computed through any factor ``A = F Fᵀ`` as
    ``[B F^{-T}]_r F^{-1}`` (the same matrix: ``F = A^{1/2} O`` with ``O`` orthogonal); returns balanced
    factors ``U = U_r Σ_r^{1/2}``, ``V = Σ_r^{1/2} V_rᵀ F^{-1}``.  Pass a :class:`~rankslim.linalg.PSDFactor`
    of ``A`` as ``factor`` to skip factorizing it (``A`` may then be ``None``); ``overwrite=True`` lets the
    whitened matrix be written into ``B``'s storage.
    """
    m, k = B.shape
    if not 1 <= rank <= min(m, k):
        raise RankError(f"rank {rank} is impossible for a {m}x{k} matrix: use 1..{min(m, k)}")
    if factor is None:
        factor = psd_factor(A)
    # the top-r SVD of the whitened B from the Gram matrix of its smaller side: a full SVD would copy it
    # and hold Vh beside it (three m x k float64 matrices at once where this holds one)
    Uz, s, Vh = gram_svd(factor.solve_t(B, overwrite=overwrite), rank)
    root = s.sqrt()
    return GSVDFactors(Uz * root, factor.solve(root[:, None] * Vh), s)


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
    if n <= 0:
        raise RankError("calibration statistics hold no samples (n = 0)")
    m, k = W.shape
    if XX.shape != (k, k) or YX.shape != W.shape:
        raise RankError(f"statistics shapes XX {tuple(XX.shape)}, YX {tuple(YX.shape)} do not match W {tuple(W.shape)}")
    # Built without DataTerms and whitened through a Cholesky factor: at k = 5632 every k x k float64
    # matrix is 254 MB, and this keeps one (the factor) where A, Cxx and A^{-1/2} with eigh's workspace
    # kept five or six.
    smax = sigma_max_psd(XX.to(torch.float64), generator) / n  # σ_max(XX/n)
    lam = damping * smax
    B = YX.to(torch.float64) / n
    for i in range(0, m, 512):  # N = YX/n + λW, in row blocks: a float32 W would be copied whole to float64
        B[i:i + 512].add_(W[i:i + 512].to(B), alpha=lam)

    def damped() -> torch.Tensor:  # A = XX/n + λI, fresh so the factor may be written into it
        A = XX.to(torch.float64) / n
        A.diagonal().add_(lam)
        return A

    factor = psd_factor(damped, 0.0 if lam > 0 else 1e-12, top=smax + lam)
    f = truncated_gsvd(B, None, rank, factor, overwrite=True)
    del B  # now the whitened matrix, no longer needed
    # Every term below goes through the factors, with no k x k product: L F = [B F^{-T}]_r, so
    # ½⟨L A, L⟩ = ½‖L F‖² = ½ Σ_{i≤r} σ_i² and ⟨L, N⟩ = ⟨L F, N F^{-T}⟩ = Σ_{i≤r} σ_i² as well.
    kept = float((f.sigma ** 2).sum())
    w2 = float(torch.linalg.vector_norm(W, dtype=torch.float64)) ** 2
    obj = yy / (2 * n) + 0.5 * lam * w2 - 0.5 * kept

    def inner(U: torch.Tensor, V: torch.Tensor, M: torch.Tensor) -> float:  # ⟨U V, M⟩ through an m x r product
        return float((U * (M.to(U) @ V.T)).sum())

    def data(U: torch.Tensor, V: torch.Tensor, LF2: float, LYX: float) -> float:
        """‖Y − UV X‖²/n = yy/n − 2⟨L, YX/n⟩ + ⟨L Cxx, L⟩, with ⟨L Cxx, L⟩ = ‖L F‖² − λ‖L‖² (Cxx = A − λI)."""
        L2 = float(((U.T @ U) * (V @ V.T)).sum())
        return yy / n - 2 * LYX + LF2 - lam * L2

    rel = svd_rel = None
    if yy > 0:
        rel = data(f.U, f.V, kept, kept - lam * inner(f.U, f.V, W)) / (yy / n)  # ⟨L, YX/n⟩ = ⟨L, N⟩ − λ⟨L, W⟩
        Us, s, Vh = gram_svd(W.to(torch.float64), rank)  # the plain truncated SVD, for comparison
        Us = Us * s
        # L_svd F = Us Vh F with Us's columns orthogonal: ‖L_svd F‖² = Σ_i s_i² ‖(Vh F)_i‖²
        LsF2 = float((factor.times(Vh) ** 2 * (s ** 2)[:, None]).sum())
        svd_rel = data(Us, Vh, LsF2, inner(Us, Vh, YX) / n) / (yy / n)
    return ZhangResult(f.U, f.V, obj, lam, rel, svd_rel)


__all__ = ["truncated_gsvd", "zhang_lowrank", "GSVDFactors", "ZhangResult"]
