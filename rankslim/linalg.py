"""The numeric kernels the decompositions share, each in exactly one place.

* :func:`gram_svd`: singular values (and vectors) from the eigendecomposition of the smaller Gram matrix;
* :func:`svt`: singular value thresholding, the prox of ``tau * ||.||_*``;
* :func:`range_finder`: randomized orthonormal basis of a matrix's dominant range (subspace iteration);
* :func:`psd_sqrt_inv_sqrt`: ``A^{1/2}`` and ``A^{-1/2}`` of a symmetric PSD matrix with explicit damping;
* :func:`psd_factor`: a factor ``F`` with ``A = F Fᵀ`` (Cholesky, ``eigh`` only when that fails), the
  cheap way to whiten by ``A``: any such ``F`` gives the same singular values as ``A^{1/2}``.

Pure functions on tensors; no ``nn.Module`` is touched.  The Gram routes square the condition
number, so pass float64: singular values below ``~1e-8 · s_max`` lose relative accuracy there
(truncation and thresholding drop those anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: singular values at most this fraction of the largest count as zero when a factor divides by them
REL_ZERO = 1e-12


def gram_svd(W: torch.Tensor, rank: int | None = None, *, left: bool = True, right: bool = True,
             eig: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Top-``rank`` SVD ``W ≈ U diag(S) Vh`` of ``W: (m, n)`` from ``eigh`` of the smaller Gram matrix.

    Returns ``U: (m, r)``, ``S: (r,)`` (descending, >= 0) and ``Vh: (r, n)`` with ``r = rank``
    (``min(m, n)`` when ``None``).  ``left=False`` / ``right=False`` skip ``U`` / ``Vh`` (returned
    as ``None``); with neither, only eigenvalues are computed (``eigvalsh``, the cheapest route to
    the spectrum).  The factor on the Gram side is an exact orthonormal eigenbasis; the other one is
    ``W E / S`` and has zero columns for singular values ``<= 1e-12 · S[0]`` (rank-deficient ``W``),
    so ``U diag(S) Vh`` is still the best rank-``r`` approximation.
    ``eig``: ``torch.linalg.eigh`` of that Gram matrix when already known (a cache), skipping both
    the product and the eigendecomposition.
    """
    m, n = W.shape
    r = min(m, n) if rank is None else int(rank)
    wide = m <= n
    if eig is None:
        G = W @ W.T if wide else W.T @ W
        if not (left or right):
            return None, torch.linalg.eigvalsh(G).flip(0)[:r].clamp_min(0).sqrt(), None
        lam, E = torch.linalg.eigh(G)
    else:
        lam, E = eig
        if not (left or right):
            return None, lam.flip(0)[:r].clamp_min(0).sqrt(), None
    lam, E = lam.flip(0)[:r], E.flip(1)[:, :r]
    S = lam.clamp_min(0).sqrt()
    # the Gram side needs no division; the other side is only formed when asked for
    if wide and not right:
        return E, S, None
    if not wide and not left:
        return None, S, E.T
    top = S[0] if S.numel() else S.new_zeros(())
    inv = torch.where(S > top * REL_ZERO, 1.0 / S.clamp_min(1e-300), torch.zeros_like(S))
    if wide:
        return (E if left else None), S, (E.T @ W) * inv[:, None]
    return (W @ E) * inv, S, (E.T if right else None)


def svt(A: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding ``U diag((s - tau)_+) Vᵀ`` of ``A: (m, k)``: the prox of ``tau ||.||_*``.

    Computed as ``A V diag((1 - tau/s)_+) Vᵀ`` from ``eigh`` of the smaller Gram matrix, several
    times faster than an SVD at layer sizes.  Returns a tensor shaped and typed like ``A``, of rank
    ``#{s > tau}``.
    """
    m, k = A.shape
    if m < k:
        return svt(A.T, tau).T
    lam, V = torch.linalg.eigh(A.T @ A)
    s = lam.clamp_min(0).sqrt()
    shrink = torch.where(s > tau, 1.0 - tau / s.clamp_min(1e-300), torch.zeros_like(s))
    keep = shrink > 0
    Vk = V[:, keep]
    return (A @ Vk) * shrink[keep] @ Vk.T


def range_finder(M: torch.Tensor, size: int, passes: int = 1, generator: torch.Generator | None = None,
                 reorthogonalize: bool = True) -> torch.Tensor:
    """Orthonormal basis of the dominant subspace of ``M: (m, n)`` by randomized subspace iteration.

    Draws a Gaussian ``Ω: (n, size)`` (from ``generator``, in ``M``'s dtype, on the CPU so a seed
    gives the same draw on every device) and applies ``M, Mᵀ, M, ...`` ``passes`` times.  An odd
    ``passes`` ends in the column space and returns ``Q: (m, size)``; an even one ends in the row
    space and returns ``Q: (n, size)``.  With ``reorthogonalize`` every intermediate product is
    QR-stabilised (Halko, Martinsson & Tropp 2011, Alg. 4.4, ``passes = 2q + 1``); without it the
    products run straight through and only the result is orthonormalised (their Alg. 4.3; GoDec's
    bilateral random projection), which is cheaper but loses directions below
    ``~eps^(1/passes) · s_max``.
    """
    Y = torch.randn(M.shape[1], size, generator=generator, dtype=M.dtype).to(M.device)
    for i in range(passes):
        if reorthogonalize and i > 0:
            Y = torch.linalg.qr(Y)[0]
        Y = (M if i % 2 == 0 else M.T) @ Y
    return torch.linalg.qr(Y)[0]


def _psd_eigh(A: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    evals, Q = torch.linalg.eigh(A.to(torch.float64))
    return evals.clamp_min(damping * max(float(evals[-1]), 1e-300)), Q


def psd_sqrt(A: torch.Tensor, damping: float = 1e-12) -> torch.Tensor:
    """``A^{1/2}`` of a symmetric PSD ``A: (k, k)`` via ``eigh``, ``(k, k)`` float64 (damping as in
    :func:`psd_sqrt_inv_sqrt`). Holds one ``k × k`` result instead of two."""
    ev, Q = _psd_eigh(A, damping)
    return (Q * ev.sqrt()) @ Q.T


def psd_inv_sqrt(A: torch.Tensor, damping: float = 1e-12) -> torch.Tensor:
    """``A^{-1/2}`` of a symmetric PSD ``A: (k, k)`` via ``eigh``, ``(k, k)`` float64 (damping as in
    :func:`psd_sqrt_inv_sqrt`). Holds one ``k × k`` result instead of two."""
    ev, Q = _psd_eigh(A, damping)
    return (Q * ev.rsqrt()) @ Q.T


def psd_sqrt_inv_sqrt(A: torch.Tensor, damping: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^{1/2}`` and ``A^{-1/2}`` of a symmetric PSD ``A: (k, k)`` via ``eigh``; both ``(k, k)`` float64.

    ``damping`` is explicit: eigenvalues below ``damping · λ_max`` are raised to that floor, so a
    singular ``A`` (dead inputs, zero padding) gives a finite pseudo-inverse square root.  Callers that need
    only one of the two use :func:`psd_sqrt` / :func:`psd_inv_sqrt` (a 5632-wide ``A`` makes each 254 MB).
    """
    ev, Q = _psd_eigh(A, damping)
    return (Q * ev.sqrt()) @ Q.T, (Q * ev.rsqrt()) @ Q.T


@dataclass
class PSDFactor:
    """``F`` with ``A ≈ F Fᵀ`` for a symmetric PSD ``A: (k, k)``, float64, never formed as ``A^{±1/2}``.

    Either the lower-triangular Cholesky factor ``tri`` (``F = tri``) or, when ``A`` was too close to
    singular for it, an eigenbasis ``Q`` with clamped eigenvalues ``ev`` (``F = Q diag(√ev)``).  ``F``
    differs from ``A^{1/2}`` by an orthogonal factor (``F = A^{1/2} O``), so ``M F`` has the singular
    values of ``M A^{1/2}`` and ``[M F^{-T}]_r F^{-1} = [M A^{-1/2}]_r A^{-1/2}``: a whitened problem solved
    through ``F`` has the same solution.  Products with ``F`` hold one ``k × k`` matrix (Cholesky's own
    storage) where ``A^{-1/2}`` needs the eigenvectors, a scaled copy and the result.
    """

    tri: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    ev: torch.Tensor | None = None

    @property
    def cholesky(self) -> bool:
        """True when ``F`` is the Cholesky factor (``eigh`` was not needed)."""
        return self.tri is not None

    def times(self, M: torch.Tensor) -> torch.Tensor:
        """``M F`` for ``M: (m, k)``."""
        if self.tri is not None:
            return M.to(self.tri) @ self.tri
        return (M.to(self.Q) @ self.Q) * self.ev.sqrt()

    def solve_t(self, M: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """``M F^{-T}`` for ``M: (m, k)`` (whitening: ``(M F^{-T})(M F^{-T})ᵀ = M A⁻¹ Mᵀ``).

        ``overwrite=True``: a float64 contiguous ``M`` may receive the result (Cholesky route), saving an
        ``m × k`` copy."""
        if self.tri is not None:
            M = M.to(self.tri)
            out = M if overwrite and M.is_contiguous() else None
            return torch.linalg.solve_triangular(self.tri.mT, M, upper=True, left=False, out=out)
        return (M.to(self.Q) @ self.Q) * self.ev.rsqrt()

    def solve(self, M: torch.Tensor) -> torch.Tensor:
        """``M F^{-1}`` for ``M: (m, k)``."""
        if self.tri is not None:
            return torch.linalg.solve_triangular(self.tri, M.to(self.tri), upper=False, left=False)
        return (M.to(self.Q) * self.ev.rsqrt()) @ self.Q.T


def psd_factor(A: torch.Tensor | Callable[[], torch.Tensor], damping: float = 1e-12, *,
               top: float | None = None) -> PSDFactor:
    """A :class:`PSDFactor` of ``A + δI`` for a symmetric PSD ``A: (k, k)``, ``δ = damping · top``.

    ``A``: the matrix (left untouched: the factor is computed in a copy), or a function that returns a
    fresh float64 one that may be overwritten: the factor is then written into its storage, so
    whitening a 5632-wide input holds one ``k × k`` matrix, not four (the function is called again if
    ``eigh`` is needed).  ``top``: ``λ_max(A)`` when known, else estimated.  Cholesky runs first; if
    ``A + δI`` is not numerically positive definite (a singular ``A`` with ``δ`` below rounding), the
    factor comes from ``eigh`` with eigenvalues clamped at ``damping · λ_max`` as in
    :func:`psd_sqrt_inv_sqrt`.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")

    def fresh() -> torch.Tensor:
        return A().to(torch.float64) if callable(A) else A.to(torch.float64, copy=True)

    C = fresh()
    if top is None:
        from .decompose.prune import sigma_max_psd
        top = sigma_max_psd(C)
    C.diagonal().add_(damping * max(float(top), 1e-300))
    info = torch.empty((), dtype=torch.int32, device=C.device)
    # through the column-major view (C is symmetric): LAPACK then works in C's storage, where the
    # row-major call copies it first (measured: +1 k x k at k = 5632)
    up, info = torch.linalg.cholesky_ex(C.mT, upper=True, out=(C.mT, info))
    if int(info) == 0:
        return PSDFactor(tri=up.mT)
    del up
    del C  # a failed factorization leaves garbage behind; eigh starts again from A
    ev, Q = _psd_eigh(fresh(), damping)
    return PSDFactor(Q=Q, ev=ev)


__all__ = ["PSDFactor", "psd_factor", "REL_ZERO", "gram_svd", "svt", "range_finder", "psd_sqrt", "psd_inv_sqrt", "psd_sqrt_inv_sqrt"]
