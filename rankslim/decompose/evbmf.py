"""Empirical variational Bayesian matrix factorization (EVBMF): the global analytic solution.

Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013).  For ``Y: (L, M)`` with ``L <= M`` (we transpose
otherwise) observed as ``Y = B A^T + E`` with i.i.d. Gaussian noise ``E ~ N(0, sigma2)`` and
Gaussian priors whose variances are themselves estimated (the *empirical* Bayes variant), the
posterior mean is a shrunken truncated SVD.  Writing ``alpha = L / M`` and

    tau_bar = 2.5129 sqrt(alpha)                            (Nakajima et al., eq. 31)
    gamma_bar^EVB = sqrt(M sigma2 (1 + tau_bar)(1 + alpha / tau_bar))   (threshold, Theorem 2)

a singular component ``gamma_h`` survives iff ``gamma_h > gamma_bar^EVB`` and its estimate is

    gamma_hat_h = gamma_h / 2 * (1 - (L + M) sigma2 / gamma_h^2
                   + sqrt((1 - (L + M) sigma2 / gamma_h^2)^2 - 4 L M sigma2^2 / gamma_h^4)).

When ``sigma2`` is unknown it is estimated by minimising the (analytically reduced) free energy
over ``sigma2`` (Nakajima et al. 2013, Theorem 5, and Nakajima et al. 2015 "Condition for perfect
dimensionality recovery"), which is a one-dimensional bounded problem: we use SciPy's bounded
Brent method, as the authors' reference code does with ``fminbnd``.

This is the rank rule Kim et al. (ICLR 2016) apply to the mode-3 and mode-4 unfoldings of a
convolution kernel to choose Tucker-2 ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: tau_bar / sqrt(alpha) from Nakajima et al. (2013): the root of a transcendental equation.
TAU_BAR_COEF = 2.5129


@dataclass
class EVBMFResult:
    """Outcome of :func:`evbmf`.

    ``rank``: number of retained components; ``sigma2``: noise variance (given or estimated);
    ``threshold``: the EVB truncation threshold on singular values; ``singular_values``: all
    singular values of ``Y`` (descending, float64, length ``min(L, M)``); ``estimates``: the
    shrunken posterior singular values of the retained components (length ``rank``);
    ``sigma2_estimated``: whether ``sigma2`` was estimated.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: torch.Tensor
    estimates: torch.Tensor
    sigma2_estimated: bool

    def to_dict(self) -> dict:
        """JSON-able summary (no tensors)."""
        return {"rank": self.rank, "sigma2": self.sigma2, "threshold": self.threshold,
                "sigma2_estimated": self.sigma2_estimated}


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """tau(x; alpha) = 0.5 (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)), for x > xubar."""
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Free energy (up to constants) as a function of ``sigma2``; ``s``: the ``H`` kept singular values."""
    H = s.size
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1.0) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1.0))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * math.log(sigma2))


def evbmf(Y: torch.Tensor, sigma2: float | None = None) -> EVBMFResult:
    """Rank (and noise variance) of ``Y: (L, M)`` by empirical variational Bayesian MF.

    ``sigma2``: known noise variance per entry; ``None`` estimates it (bounded 1-D minimisation of
    the free energy between the bounds of Nakajima et al.).  The SVD is computed in float64.
    Returns an :class:`EVBMFResult` whose ``rank`` may be 0 (pure noise).
    Raises ``ValueError`` for a non-2-D, empty or non-finite ``Y`` or a non-positive ``sigma2``.
    """
    if Y.dim() != 2 or Y.numel() == 0:
        raise ValueError(f"evbmf needs a non-empty 2-D matrix, got shape {tuple(Y.shape)}")
    Y64 = Y.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(Y64).all()):
        raise ValueError("evbmf got a matrix holding NaN/Inf values")
    if sigma2 is not None and not sigma2 > 0:
        raise ValueError(f"sigma2 must be positive, got {sigma2}")
    if Y64.shape[0] > Y64.shape[1]:
        Y64 = Y64.T  # the solution is stated for L <= M
    L, M = Y64.shape
    s_t = torch.linalg.svdvals(Y64)
    s = s_t.numpy()
    H = L  # all components are candidates
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    xubar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    estimated = sigma2 is None
    if float(np.sum(s ** 2)) == 0.0:
        return EVBMFResult(0, float(sigma2 or 0.0), 0.0, s_t, torch.zeros(0, dtype=torch.float64), estimated)
    if sigma2 is None:
        residual = 0.0  # H == L: nothing left outside the kept spectrum
        # the largest rank EVB can possibly retain (Nakajima et al. 2015, eq. 22), as an index
        eH_ub = int(min(math.ceil(L / (1.0 + alpha)) - 1, H)) - 1
        tail_start = min(max(eH_ub + 1, 0), L - 1)
        upper = (float(np.sum(s ** 2)) + residual) / (L * M)
        lower = max(s[tail_start] ** 2 / (M * xubar), float(np.mean(s[tail_start:] ** 2)) / M)
        # a degenerate tail (exactly low-rank input) would give lower == 0: keep the log finite
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            from scipy.optimize import minimize_scalar
            res = minimize_scalar(_free_energy, args=(L, M, s, residual, xubar), bounds=(lower, upper),
                                  method="bounded", options={"xatol": 1e-12 * upper})
            sigma2 = float(res.x)
    threshold = math.sqrt(M * sigma2 * (1.0 + tau_bar) * (1.0 + alpha / tau_bar))
    pos = int(np.sum(s > threshold))
    sp = s[:pos]
    a = 1.0 - (L + M) * sigma2 / sp ** 2
    est = sp / 2.0 * (a + np.sqrt(np.maximum(a ** 2 - 4.0 * L * M * sigma2 ** 2 / sp ** 4, 0.0)))
    return EVBMFResult(pos, float(sigma2), threshold, s_t, torch.from_numpy(est), estimated)


__all__ = ["EVBMFResult", "evbmf", "TAU_BAR_COEF"]
