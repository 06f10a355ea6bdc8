"""Pruning as sparse approximation: magnitude hard thresholding and data-aware IHT (GreBdec model 2).

Data-free (Han et al. 2015): keep the ``c`` entries of ``W`` with the largest magnitude — the exact
solution of ``min ‖W − S‖_F s.t. card(S) ≤ c`` (Han et al. pick a threshold ``quality·std(W)``;
a cardinality is the same thing expressed as a budget).

Data-aware (GreBdec eq. 2, Lagrangian form)::

    min_S  1/(2n) ‖Y − S X‖_F² + λ/2 ‖W − S‖_F²   s.t. card(S) ≤ c

solved by iterative hard thresholding (Blumensath & Davies; GreBdec cites Bahmani et al.)
``S ← P_c(S − η ∇)`` with ``∇ = S A − N``, ``A = XXᵀ/n + λI``, ``N = YXᵀ/n + λW``, and step
``η ≤ 1/σ_max(A)`` so every step decreases the objective (majorisation argument).  Optionally the
kept weights are then refit by least squares on their support, row by row (what Net-Trim does):
``S_{i,Ω} = N_{i,Ω} A_{ΩΩ}⁻¹`` — the exact minimiser for the final mask, so it can only lower the
objective.  Everything works on the calibration sums (``XX``, ``YX``, ``n``) from
:class:`rankslim.calibrate.LayerStats`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RankError


def hard_threshold(M: torch.Tensor, card: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_Ω(M)``: keep the ``card`` entries of largest magnitude. Returns ``(values, mask)``, both shaped like ``M``.

    Ties are broken by ``topk`` (deterministic for a given input); ``card`` is clipped to ``[0, M.numel()]``.
    """
    card = max(0, min(int(card), M.numel()))
    mask = torch.zeros(M.numel(), dtype=torch.bool, device=M.device)
    if card > 0:
        mask[M.reshape(-1).abs().topk(card, sorted=False).indices] = True
    mask = mask.reshape(M.shape)
    return M * mask, mask


def magnitude_prune(W: torch.Tensor, card: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free pruning of ``W: (m, k)`` to ``card`` non-zeros: ``(S, mask)`` (Han et al., as a cardinality)."""
    if card < 0:
        raise RankError(f"cardinality must be >= 0, got {card}")
    return hard_threshold(W, card)


def sigma_max_psd(A: torch.Tensor, generator: torch.Generator | None = None, iters: int = 200,
                  tol: float = 1e-7) -> float:
    """Largest eigenvalue of a symmetric PSD ``A: (k, k)`` (exact for k ≤ 2048, else power iteration)."""
    k = A.shape[0]
    if k <= 2048:
        return float(torch.linalg.eigvalsh(A)[-1].clamp_min(0))
    gen = generator or torch.Generator().manual_seed(0)
    v = torch.randn(k, 1, generator=gen, dtype=A.dtype).to(A.device)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = A @ v
        new = float(w.norm())
        v = w / max(new, 1e-300)
        if abs(new - lam) <= tol * max(new, 1e-300):
            lam = new
            break
        lam = new
    return lam


@dataclass
class DataTerms:
    """The quadratic form shared by every data-aware solver, from calibration sums.

    With ``Cxx = XX/n`` and ``Myx = YX/n``, the objective
    ``1/(2n)‖Y − Ŵ X‖² + λ/2‖W − Ŵ‖² = ½⟨Ŵ A, Ŵ⟩ − ⟨Ŵ, N⟩ + const`` where ``A = Cxx + λI: (k, k)``,
    ``N = Myx + λW: (m, k)`` and ``const = yy/(2n) + λ/2‖W‖²`` (``yy = Σ‖y‖²``; 0 when unknown,
    which only shifts the objective).  ``smax`` is ``σ_max(Cxx)``; ``lam = 10^t · smax``.
    """

    W: torch.Tensor
    Cxx: torch.Tensor
    Myx: torch.Tensor
    A: torch.Tensor
    N: torch.Tensor
    lam: float
    smax: float
    const: float
    extras: dict = field(default_factory=dict)

    @classmethod
    def build(cls, W: torch.Tensor, XX: torch.Tensor, YX: torch.Tensor, n: int, t: float | None,
              yy: float = 0.0, lam: float | None = None, generator: torch.Generator | None = None) -> "DataTerms":
        """Terms for ``W: (m, k)``, ``XX: (k, k)``, ``YX: (m, k)`` over ``n`` columns; λ = 10^t·σ_max(XX/n) or ``lam``."""
        if n <= 0:
            raise RankError("calibration statistics hold no samples (n = 0)")
        W = W.to(torch.float64)
        Cxx = XX.to(W) / n
        Myx = YX.to(W) / n
        if Cxx.shape != (W.shape[1], W.shape[1]) or Myx.shape != W.shape:
            raise RankError(f"statistics shapes XX {tuple(XX.shape)}, YX {tuple(YX.shape)} do not match W {tuple(W.shape)}")
        smax = sigma_max_psd(Cxx, generator)
        if lam is None:
            lam = 0.0 if t is None else (10.0 ** t) * smax
        A = Cxx + lam * torch.eye(Cxx.shape[0], dtype=W.dtype, device=W.device)
        N = Myx + lam * W
        const = yy / (2 * n) + 0.5 * lam * float((W * W).sum())
        return cls(W, Cxx, Myx, A, N, float(lam), smax, const)

    def objective(self, W_hat: torch.Tensor, W_hat_A: torch.Tensor | None = None) -> float:
        """``1/(2n)‖Y − Ŵ X‖² + λ/2‖W − Ŵ‖²`` for ``Ŵ: (m, k)`` (pass ``Ŵ A`` if already computed)."""
        WA = W_hat @ self.A if W_hat_A is None else W_hat_A
        return float(0.5 * (WA * W_hat).sum() - (W_hat * self.N).sum()) + self.const


@dataclass
class PruneResult:
    """``S: (m, k)`` (zero outside ``mask``), ``mask`` (bool), ``objective`` per IHT iteration (model 2),
    ``lam``/``eta`` used, and ``refit`` (objective after the support refit, or ``None``)."""

    S: torch.Tensor
    mask: torch.Tensor
    objective: list[float]
    lam: float
    eta: float
    refit: float | None = None


def refit_support(terms: DataTerms, mask: torch.Tensor, damping: float = 1e-10) -> torch.Tensor:
    """Least-squares values on a fixed support: row ``i`` gets ``N_{i,Ω} A_{ΩΩ}⁻¹`` (Ω = ``mask[i]``).

    ``damping·σ_max(A)`` is added to the diagonal so singular ``A_ΩΩ`` (dead inputs) stays solvable.
    """
    S = torch.zeros_like(terms.N)
    eps = damping * max(terms.smax + terms.lam, 1e-300)
    for i in range(mask.shape[0]):
        idx = mask[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        Aoo = terms.A[idx][:, idx]
        Aoo = Aoo + eps * torch.eye(idx.numel(), dtype=Aoo.dtype, device=Aoo.device)
        S[i, idx] = torch.linalg.solve(Aoo, terms.N[i, idx])
    return S


def iht_prune(W: torch.Tensor, XX: torch.Tensor, YX: torch.Tensor, n: int, card: int, *, yy: float = 0.0,
              t: float | None = -2.0, eta: float | None = None, iters: int = 100, tol: float = 1e-7,
              refit: bool = True, generator: torch.Generator | None = None) -> PruneResult:
    """Data-aware pruning (GreBdec model 2) by iterative hard thresholding from the magnitude solution.

    ``W: (m, k)`` original weights; ``XX: (k, k)``, ``YX: (m, k)``, ``n``: calibration sums;
    ``card``: non-zeros kept; ``t``: λ = 10^t·σ_max(XX/n) (``None`` → λ = 0); ``eta``: step,
    at most (default) 1/σ_max(A).  Stops after ``iters`` steps or when the objective changes by
    less than ``tol`` (relative).  ``refit`` solves least squares on the final support.
    """
    if card < 0:
        raise RankError(f"cardinality must be >= 0, got {card}")
    terms = DataTerms.build(W, XX, YX, n, t, yy, generator=generator)
    L = terms.smax + terms.lam
    step = 1.0 / L if L > 0 else 1.0
    if eta is not None:
        step = min(float(eta), step)
    S, mask = hard_threshold(terms.W, card)
    SA = S @ terms.A
    obj = [terms.objective(S, SA)]
    for _ in range(iters):
        S_new, mask_new = hard_threshold(S - step * (SA - terms.N), card)
        SA_new = S_new @ terms.A
        f = terms.objective(S_new, SA_new)
        S, mask, SA = S_new, mask_new, SA_new
        obj.append(f)
        if abs(obj[-2] - f) <= tol * max(abs(f), 1e-300):
            break
    res = PruneResult(S, mask, obj, terms.lam, step)
    if refit and card > 0:
        S_fit = refit_support(terms, mask)
        f = terms.objective(S_fit)
        if f <= obj[-1]:  # exact minimiser on the support; guard against round-off on singular A
            res.S, res.refit = S_fit * mask, f
        else:
            res.refit = obj[-1]
    return res


__all__ = ["hard_threshold", "magnitude_prune", "iht_prune", "refit_support", "DataTerms", "PruneResult",
           "sigma_max_psd"]
