"""Low-rank + column-sparse approximation of a layer's *non-linear* response by ADMM.

The "Unified Framework" of the CNN low-rank approximation lecture (after Zhang et al. 2015's
non-linear response reconstruction): for one layer with inputs ``X: (k, n)``, original
post-activation outputs ``Y = r(W X + b): (m, n)`` and ``r = ReLU``,

    min_{A,B}  ||Y - r((A + B) X + b)||_F²  +  λ1 ||A||_{2,1}  +  λ2 ||B||_*

(``||A||_{2,1}`` = sum of the column 2-norms, so A is zero column-wise, i.e. it reads only a few
input features/channels; ``B`` is low rank).  With ``M = A + B`` as a separate variable and the
augmented Lagrangian ``L_t`` of the lecture, ADMM iterates

    A ← prox_{λ1/t ||.||_{2,1}}(M - B - Λ/t)        (column-wise shrinkage, Liu et al. 2013)
    B ← prox_{λ2/t ||.||_*}(M - A - Λ/t)            (singular value thresholding, Cai et al. 2010)
    M ← argmin_M ||Y - r(M X + b)||² + t/2 ||A + B - M + Λ/t||²
    Λ ← Λ + t (A + B - M)

The first two steps are the lecture's closed forms.  The M-step is non-convex for ReLU and the
lecture gives no closed form for it; we take ``mm_steps`` majorize-minimize steps, each exact:
entry-wise, ``(y - relu(z))²`` is majorized at ``z0`` by ``(ỹ - z)²`` with ``ỹ = y`` where
``z0 > 0`` and ``ỹ = z0`` where ``z0 <= 0`` (valid because ``y >= 0``), so each step is the
ridge-type solve ``M (2 X Xᵀ + t I) = 2 (Ỹ - b) Xᵀ + t (A + B + Λ/t)`` with one Cholesky factor
for the whole run, and the M-objective never increases.  With ``activation="linear"`` the
M-step is that solve with ``Ỹ = Y`` (exact), and the whole problem is convex.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import DataError
# the prox of tau ||.||_* is singular value thresholding; kept importable under the lecture's name
from ..linalg import svt as prox_nuclear

ACTIVATIONS = ("relu", "linear")


@dataclass
class ReluAdmmResult:
    """Outcome of :func:`relu_admm`.

    ``A: (m, k)`` column-sparse part (zero columns exactly), ``B: (m, k)`` low-rank part,
    ``M: (m, k)`` the splitting variable (``≈ A + B`` at convergence); ``objective`` the penalised
    objective at ``A + B``; ``data_error`` ``||Y - r((A+B) X + b)||_F``; ``iterations``,
    ``converged``, ``seconds``; ``history`` per-iteration objective and primal/dual residuals.
    """

    A: torch.Tensor
    B: torch.Tensor
    M: torch.Tensor
    objective: float
    data_error: float
    iterations: int
    converged: bool
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def columns(self) -> torch.Tensor:
        """Indices of the non-zero columns of ``A`` (ascending, int64)."""
        return torch.nonzero(self.A.abs().sum(0) > 0).flatten()

    @property
    def rank(self) -> int:
        """Numerical rank of ``B`` (singular values above 1e-10 of the largest)."""
        s = torch.linalg.svdvals(self.B)
        return int((s > 1e-10 * max(float(s[0]), 1e-300)).sum()) if s.numel() else 0


def _act(Z: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(Z) if activation == "relu" else Z


def relu_admm_objective(A: torch.Tensor, B: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                        bias: torch.Tensor | None, lam_sparse: float, lam_rank: float,
                        activation: str = "relu") -> float:
    """``||Y - r((A+B) X + b)||_F² + λ1 ||A||_{2,1} + λ2 ||B||_*`` (float). Shapes as :func:`relu_admm`."""
    b = torch.zeros(Y.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    R = Y.to(torch.float64) - _act((A + B).to(torch.float64) @ X.to(torch.float64) + b[:, None], activation)
    return (float((R * R).sum()) + lam_sparse * float(torch.linalg.vector_norm(A.to(torch.float64), dim=0).sum())
            + lam_rank * float(torch.linalg.matrix_norm(B.to(torch.float64), ord="nuc")))


def prox_l21_columns(C: torch.Tensor, tau: float) -> torch.Tensor:
    """Prox of ``tau ||.||_{2,1}`` (column norms): shrink each column of ``C: (m, k)`` by ``tau`` in 2-norm."""
    norms = torch.linalg.vector_norm(C, dim=0)
    scale = torch.where(norms > tau, (norms - tau) / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return C * scale


def relu_admm(
    X: torch.Tensor,
    Y: torch.Tensor,
    bias: torch.Tensor | None,
    lam_sparse: float,
    lam_rank: float,
    *,
    W0: torch.Tensor | None = None,
    t: float | None = None,
    activation: str = "relu",
    max_iter: int = 500,
    mm_steps: int = 3,
    tol: float = 1e-6,
    record: bool = False,
) -> ReluAdmmResult:
    """ADMM for the lecture's ``min ||Y - r((A+B)X + b)||² + λ1||A||_{2,1} + λ2||B||_*``.

    ``X: (k, n)`` layer inputs; ``Y: (m, n)`` target *post-activation* outputs (``relu(W X + b)``
    for ReLU layers, ``W X + b`` for ``activation="linear"``); ``bias: (m,)`` kept fixed (or None);
    ``lam_sparse`` = λ1 and ``lam_rank`` = λ2 (absolute; see the method glue for scale-free
    choices).  ``W0: (m, k)`` initialises ``M`` and ``B`` (default zeros).  ``t``: ADMM penalty
    (default ``2 ||X||_F² / k``, twice the mean eigenvalue of ``X Xᵀ``: the data term's typical
    curvature).
    Stops when ``||A+B-M||_F`` and ``t ||M_k - M_{k-1}||_F`` both fall below
    ``tol * max(1, ||M||_F)`` and ``tol * t * max(1, ||M||_F)``.  float64 throughout.
    """
    t_start = time.perf_counter()
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if X.dim() != 2 or Y.dim() != 2 or X.shape[1] != Y.shape[1]:
        raise DataError(f"relu_admm needs X: (in, n) and Y: (out, n); got {tuple(X.shape)} and {tuple(Y.shape)}")
    if lam_sparse < 0 or lam_rank < 0:
        raise ValueError("lam_sparse and lam_rank must be >= 0")
    X, Y = X.detach().to(torch.float64), Y.detach().to(torch.float64)
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise DataError("relu_admm inputs contain NaN or Inf; check the calibration data")
    k, n = X.shape
    m = Y.shape[0]
    b = torch.zeros(m, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).reshape(m)
    XXt = X @ X.T
    if t is None:
        # twice the MEAN eigenvalue of X Xᵀ: the data term's typical curvature.  The largest
        # eigenvalue (its Lipschitz constant) is dominated by the mean direction of ReLU inputs and
        # makes every step crawl along the other directions (LeNet-5 fc1: 180x larger).
        t = 2.0 * float(torch.diagonal(XXt).sum()) / k
    if t <= 0:
        raise DataError("the calibration inputs X are all zero (or t <= 0); relu_admm needs informative data")
    # 2 X Xᵀ + t I: SPD with smallest eigenvalue >= t > 0, so no extra damping is needed.
    Lchol = torch.linalg.cholesky(2.0 * XXt + t * torch.eye(k, dtype=torch.float64))
    M = torch.zeros(m, k, dtype=torch.float64) if W0 is None else W0.detach().to(torch.float64).clone()
    A = torch.zeros_like(M)
    B = M.clone()
    Lam = torch.zeros_like(M)
    history: list[dict] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        A = prox_l21_columns(M - B - Lam / t, lam_sparse / t)
        B = prox_nuclear(M - A - Lam / t, lam_rank / t)
        C = A + B + Lam / t
        M_old = M
        for _ in range(mm_steps if activation == "relu" else 1):
            if activation == "relu":
                Z0 = M @ X + b[:, None]
                Yt = torch.where(Z0 > 0, Y, Z0)  # majorizer target (see module docstring)
            else:
                Yt = Y
            rhs = 2.0 * (Yt - b[:, None]) @ X.T + t * C
            M = torch.cholesky_solve(rhs.T, Lchol).T
        r = A + B - M
        Lam = Lam + t * r
        r_norm = float(torch.linalg.vector_norm(r))
        s_norm = t * float(torch.linalg.vector_norm(M - M_old))
        scale = max(1.0, float(torch.linalg.vector_norm(M)))
        if record:
            history.append({"iter": it, "r": r_norm, "s": s_norm,
                            "objective": relu_admm_objective(A, B, X, Y, b, lam_sparse, lam_rank, activation)})
        if r_norm <= tol * scale and s_norm <= tol * t * scale:
            converged = True
            break
    obj = relu_admm_objective(A, B, X, Y, b, lam_sparse, lam_rank, activation)
    R = Y - _act((A + B) @ X + b[:, None], activation)
    return ReluAdmmResult(A, B, M, obj, float(torch.linalg.vector_norm(R)), it, converged,
                          time.perf_counter() - t_start, history)


__all__ = ["ReluAdmmResult", "relu_admm", "relu_admm_objective", "prox_l21_columns", "prox_nuclear", "ACTIVATIONS"]
