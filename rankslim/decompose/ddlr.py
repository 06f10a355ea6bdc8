"""Data-Driven Low-Rank (DDLR) layer compression: Papadimitriou & Jain, problem (4).

For one layer with input ``X: (k, n)`` (``n`` calibration columns), original pre-bias output
``Y = W X: (m, n)`` and bias ``b: (m,)``, the post-ReLU output is ``relu(Y + b 1ᵀ)``.  DDLR
finds the weight of smallest nuclear norm whose output agrees with the original where the
original was positive, and stays non-positive where the original was not (the ReLU relaxation
of Net-Trim).  In our column convention (the paper stores samples as rows, ``Y_{l-1} U``):

    minimize_U   ||U||_*
    subject to   ||(U X + b 1ᵀ - Y - b 1ᵀ) ∘ M||_F <= eps          M  = [Y + b 1ᵀ > 0]
                 (U X + b 1ᵀ) ∘ M' <= 0                          M' = 1 - M

with ``eps = eps_rel * ||X||_F`` (the paper's ``eps_l = c * C``, ``C = ||Y_{l-1}||_F``, the
Frobenius norm of the layer *input*).  ``U = W`` is always feasible, so the problem is never
empty when X and Y come from the same forward pass.

Two solvers:

* :func:`ddlr_cvxpy` states the problem in cvxpy and solves it with SCS, as in the paper
  (an SDP through the nuclear-norm cone) — exact but cubic in ``m + k``;
* :func:`ddlr_admm`, our own ADMM (the paper's "future work"), for large layers.  Splitting
  ``V = U`` and ``Z = U X`` turns every step into a closed form:

      U ← [(V - P) + γ (Z - Q) Xᵀ] (I + γ X Xᵀ)⁻¹        (one Cholesky factor for all iterations)
      V ← SVT_{1/ρ}(U + P)                               (singular value thresholding)
      Z ← Π_C(U X + Q)                                   (ball on M entries, clamp on M' entries)
      P ← P + U - V,   Q ← Q + U X - Z                   (scaled duals)

  ``γ = k / ||X||_F²`` (one over the mean eigenvalue of ``X Xᵀ``) weights the two constraints so
  their residuals are commensurate, ``α = 1.6`` over-relaxes the steps, and
  ``ρ`` is adapted by residual balancing (Boyd et al. 2011, §3.4.1).  The projection onto the
  constraint set ``C`` is exact because ``M`` and ``M'`` partition the entries: masked entries
  are projected onto the Frobenius ball of radius ``eps`` around ``Y`` and the others are
  clamped to ``<= -b``.  The returned weight is ``V`` (exactly low rank after SVT); its
  residual constraint violation is reported and tested.

:func:`elbow_rank` implements the paper's elbow rule on the singular values of the solution.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import DataError, RankslimError
from ..linalg import svt

#: ``solver="auto"`` uses cvxpy + SCS when the SDP is small enough to solve in a few seconds:
#: ``(m + k)`` at most this (the PSD cone side) and ``m * k * n`` (non-zeros of the linear map
#: ``U -> U X`` that SCS factorises) at most :data:`CVXPY_MAX_ENTRIES`; larger layers use
#: :func:`ddlr_admm` (measured: an 80 x 80 layer with n = 512 takes ~30 s in SCS, ~10 s in the ADMM).
CVXPY_MAX_SIDE = 200
CVXPY_MAX_ENTRIES = 1_000_000


@dataclass
class DDLRResult:
    """Outcome of a DDLR solve.

    ``U: (m, k)`` float64 solution of problem (4); ``sigma`` its singular values (descending);
    ``objective`` = ``||U||_*``; ``eps`` the absolute tolerance used; ``masked_error`` =
    ``||(U X + b - Y - b) ∘ M||_F``; ``max_violation`` = largest positive entry of
    ``(U X + b) ∘ M'`` (0 when feasible); ``solver`` "scs" or "admm"; ``iterations``;
    ``converged``; ``seconds``; ``history``: per-iteration residuals (ADMM only).
    """

    U: torch.Tensor
    sigma: torch.Tensor
    objective: float
    eps: float
    masked_error: float
    max_violation: float
    solver: str
    iterations: int
    converged: bool
    seconds: float
    history: list[dict] = field(default_factory=list)

    def info(self) -> dict:
        """JSON-able summary (no tensors)."""
        return {"solver": self.solver, "objective": self.objective, "eps": self.eps,
                "masked_error": self.masked_error, "max_violation": self.max_violation,
                "iterations": self.iterations, "converged": self.converged, "seconds": round(self.seconds, 3)}


def _check(X: torch.Tensor, Y: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes/finiteness; return float64 ``X: (k, n)``, ``Y: (m, n)``, ``b: (m,)``."""
    if X.dim() != 2 or Y.dim() != 2:
        raise DataError(f"DDLR needs matrices X: (in, n) and Y: (out, n); got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[1] != Y.shape[1]:
        raise DataError(f"X and Y must have the same number of columns (samples): {X.shape[1]} != {Y.shape[1]}")
    if X.shape[1] == 0:
        raise DataError("DDLR needs at least one calibration sample")
    X, Y = X.detach().to(torch.float64), Y.detach().to(torch.float64)
    b = torch.zeros(Y.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    if b.shape[0] != Y.shape[0]:
        raise DataError(f"bias has {b.shape[0]} entries but Y has {Y.shape[0]} rows")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all() and torch.isfinite(b).all()):
        raise DataError("DDLR inputs contain NaN or Inf; check the calibration data")
    return X, Y, b


def ddlr_epsilon(X: torch.Tensor, eps_rel: float) -> float:
    """The paper's absolute tolerance ``eps_l = eps_rel * ||Y_{l-1}||_F`` for input ``X: (k, n)``."""
    if eps_rel < 0:
        raise ValueError(f"eps_rel must be >= 0, got {eps_rel}")
    return float(eps_rel) * float(torch.linalg.matrix_norm(X.to(torch.float64)))


ACTIVATIONS = ("relu", "linear")


def _positive_mask(Y: torch.Tensor, b: torch.Tensor, activation: str) -> torch.Tensor:
    """``M`` of problem (4): entries whose original output ``Y + b`` is positive (all of them for "linear")."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "linear":
        return torch.ones_like(Y, dtype=torch.bool)
    return (Y + b[:, None]) > 0


def ddlr_violation(U: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, bias: torch.Tensor | None,
                   activation: str = "relu") -> tuple[float, float]:
    """``(masked_error, max_violation)`` of weight ``U: (m, k)`` in problem (4).

    ``masked_error = ||(U X - Y) ∘ M||_F`` over the entries where ``Y + b > 0``;
    ``max_violation = max(0, max over the other entries of U X + b)``.
    """
    X, Y, b = _check(X, Y, bias)
    Z = U.to(torch.float64) @ X + b[:, None]
    pos = _positive_mask(Y, b, activation)
    err = float(torch.linalg.vector_norm(torch.where(pos, Z - Y - b[:, None], 0.0)))
    viol = float(torch.where(pos, torch.zeros_like(Z), Z).clamp_min(0).max()) if Z.numel() else 0.0
    return err, viol


def elbow_rank(sigma: torch.Tensor) -> int:
    """The elbow rule: how many singular values come before the elbow of the curve ``sigma``.

    The curve ``(i, sigma_i)``, both axes scaled to [0, 1], is compared with the chord from its
    first to its last point; the elbow is the point furthest below the chord (the start of the
    flat tail), and the rank is the number of values before it.  A spectrum with ``r`` equal
    non-zero values followed by zeros gives ``r``; at least 1 is returned.  ``sigma``: (p,)
    descending, non-negative.
    """
    s = sigma.detach().to(torch.float64).flatten()
    p = s.numel()
    if p == 0:
        raise ValueError("elbow_rank needs at least one singular value")
    if p <= 2 or float(s[0]) <= 0:
        return 1
    x = torch.linspace(0.0, 1.0, p, dtype=torch.float64)
    y = (s - s[-1]) / (s[0] - s[-1]) if float(s[0] - s[-1]) > 0 else torch.zeros_like(s)
    below = (1.0 - x) - y  # chord from (0, 1) to (1, 0) minus the curve
    j = int(torch.argmax(below))  # 0-based index of the elbow point
    if float(below[j]) <= 1e-12:  # straight or concave curve: no elbow, keep everything but the last
        return max(1, p - 1) if float(s[-1]) <= 1e-12 * float(s[0]) else p
    return max(1, j)


def _project_c(Z: torch.Tensor, Ypos: torch.Tensor, pos: torch.Tensor, eps: float, upper: torch.Tensor) -> torch.Tensor:
    """Projection onto ``{Z : ||(Z - Ypos) ∘ M||_F <= eps, Z ∘ M' <= upper}`` (entries separate)."""
    d = torch.where(pos, Z - Ypos, 0.0)
    nd = float(torch.linalg.vector_norm(d))
    scale = 1.0 if nd <= eps else eps / nd
    return torch.where(pos, Ypos + scale * d, torch.minimum(Z, upper))


OBJECTIVES = ("nuclear", "l1")


def _soft(A: torch.Tensor, tau: float) -> torch.Tensor:
    """Entry-wise soft thresholding (prox of ``tau ||.||_1``)."""
    return torch.sign(A) * (A.abs() - tau).clamp_min(0)


def _objective(U: torch.Tensor, objective: str) -> float:
    if objective == "nuclear":
        return float(torch.linalg.matrix_norm(U, ord="nuc"))
    return float(U.abs().sum())


def ddlr_admm(
    X: torch.Tensor,
    Y: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    U0: torch.Tensor | None = None,
    rho: float | None = None,
    max_iter: int = 3000,
    tol: float = 1e-5,
    adaptive: bool = True,
    record: bool = False,
    objective: str = "nuclear",
    alpha: float = 1.6,
    check_every: int = 5,
    activation: str = "relu",
    gamma: float | None = None,
) -> DDLRResult:
    """Solve DDLR problem (4) by ADMM (splitting ``V = U``, ``Z = U X``; see the module docstring).

    ``X: (k, n)`` layer inputs, ``Y: (m, n)`` original pre-bias outputs ``W X``, ``bias: (m,)`` or
    None, ``eps`` the absolute Frobenius tolerance.  ``U0: (m, k)`` warm start (the original ``W``
    is feasible and a good start; zeros otherwise).  ``rho``: initial penalty (default
    ``10 / sigma_1(U0)``), adapted by residual balancing when ``adaptive``.  Stops when the
    primal and dual residuals fall under the usual absolute+relative tolerances with
    ``eps_abs = eps_rel = tol`` (Boyd et al. 2011, eq. 3.12) or after ``max_iter`` iterations.
    ``record`` keeps per-iteration residuals and objective in ``history``.  float64 throughout.
    ``gamma``: weight of the ``Z = U X`` constraint relative to ``V = U`` (default ``k / ||X||_F²``).
    ``alpha``: over-relaxation in [1, 1.8] (1 = plain ADMM); residuals are checked every
    ``check_every`` iterations (every iteration when ``record``).
    ``activation="linear"`` drops the ReLU masks (every entry in the Frobenius constraint, no
    inequality) for layers not followed by a ReLU.
    ``objective="l1"`` minimises the entry-wise ``||U||_1`` instead (the Net-Trim program of Aghasi
    et al. 2017 under the same constraints; the V-step becomes soft thresholding).
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not 0 < alpha < 2:
        raise ValueError(f"over-relaxation alpha must lie in (0, 2), got {alpha}")
    X, Y, b = _check(X, Y, bias)
    k, n = X.shape
    m = Y.shape[0]
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    pos = _positive_mask(Y, b, activation)
    Ypos = Y  # target of U X on positive entries (bias cancels on both sides)
    upper = (-b)[:, None].expand(m, n)  # U X <= -b on non-positive entries
    xnorm2 = float((X * X).sum())
    if xnorm2 == 0:
        raise DataError("the calibration inputs X are all zero; DDLR needs informative data")
    if gamma is None:
        # 1 / (mean eigenvalue of X Xᵀ).  Weighting by the largest eigenvalue instead (1/||X||_2²)
        # starves every direction but the first when X is a ReLU activation (its mean direction
        # dominates): 5-8x more iterations and 10x larger violations on LeNet-5's fc layers.
        gamma = X.shape[0] / xnorm2
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    # I + γ X Xᵀ is SPD with eigenvalues in [1, 1 + k]: Cholesky is safe, no damping needed.
    G = torch.eye(k, dtype=torch.float64) + gamma * (X @ X.T)
    L = torch.linalg.cholesky(G)
    U = torch.zeros(m, k, dtype=torch.float64) if U0 is None else U0.detach().to(torch.float64).clone()
    V = U.clone()
    Z = _project_c(U @ X, Ypos, pos, eps, upper)
    P = torch.zeros_like(U)
    Q = torch.zeros_like(Z)
    # the V-step threshold 1/rho starts at a tenth of the weight's scale (spectral or entry-wise)
    if U0 is not None:
        s1 = float(torch.linalg.matrix_norm(U, ord=2)) if objective == "nuclear" else float(U.abs().max())
    else:
        s1 = 0.0
    if rho is None:
        rho = 10.0 / s1 if s1 > 0 else 10.0 / math.sqrt(float((Y * Y).sum()) / xnorm2 * k + 1e-300)
    history: list[dict] = []
    converged = False
    it = 0
    sq_p, sq_n = math.sqrt(m * k + m * n), math.sqrt(m * k)
    for it in range(1, max_iter + 1):
        rhs = (V - P) + gamma * ((Z - Q) @ X.T)
        U = torch.cholesky_solve(rhs.T, L).T  # U G = rhs  <=>  G Uᵀ = rhsᵀ (G symmetric)
        UX = U @ X
        V_old, Z_old = V, Z
        # over-relaxation (Boyd et al. 2011, §3.4.3): mix the new U-block with the previous V/Z-block
        Uh = alpha * U + (1 - alpha) * V_old
        UXh = alpha * UX + (1 - alpha) * Z_old
        if objective == "nuclear":
            V = svt(Uh + P, 1.0 / rho)
        else:
            V = _soft(Uh + P, 1.0 / rho)
        Z = _project_c(UXh + Q, Ypos, pos, eps, upper)
        P = P + (Uh - V)
        Q = Q + (UXh - Z)
        if not record and it % check_every and it != max_iter:
            continue
        rV, rZ = U - V, UX - Z
        r_norm = math.sqrt(float((rV * rV).sum()) + gamma * float((rZ * rZ).sum()))
        s_mat = (V - V_old) + gamma * ((Z - Z_old) @ X.T)
        s_norm = rho * float(torch.linalg.vector_norm(s_mat))
        ax = math.sqrt(float((U * U).sum()) + gamma * float((UX * UX).sum()))
        bz = math.sqrt(float((V * V).sum()) + gamma * float((Z * Z).sum()))
        eps_pri = sq_p * tol + tol * max(ax, bz)
        eps_dual = sq_n * tol + tol * rho * float(torch.linalg.vector_norm(P + gamma * (Q @ X.T)))
        if record:
            history.append({"iter": it, "r": r_norm, "s": s_norm, "rho": rho, "objective": _objective(V, objective)})
        if r_norm <= eps_pri and s_norm <= eps_dual:
            converged = True
            break
        if adaptive and it % (2 * check_every) == 0:
            # residual balancing; the scaled duals scale inversely with rho
            if r_norm > 10 * s_norm:
                rho *= 2.0
                P, Q = P / 2.0, Q / 2.0
            elif s_norm > 10 * r_norm:
                rho /= 2.0
                P, Q = P * 2.0, Q * 2.0
    sigma = torch.linalg.svdvals(V)
    err, viol = ddlr_violation(V, X, Y, b, activation)
    return DDLRResult(V, sigma, _objective(V, objective), float(eps), err, viol, "admm", it, converged,
                      time.perf_counter() - t0, history)


def ddlr_cvxpy(
    X: torch.Tensor,
    Y: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    max_iter: int = 20000,
    tol: float = 1e-6,
    verbose: bool = False,
    objective: str = "nuclear",
    activation: str = "relu",
) -> DDLRResult:
    """Solve DDLR problem (4) with cvxpy + SCS (the paper's route). Shapes as :func:`ddlr_admm`.

    ``tol`` is SCS's ``eps_abs``/``eps_rel``; ``objective="l1"`` gives the Net-Trim program;
    ``activation`` as in :func:`ddlr_admm`.
    Raises :class:`RankslimError` when SCS reports the problem infeasible or fails (use :func:`ddlr_admm` then).
    """
    import cvxpy as cp
    import numpy as np

    t0 = time.perf_counter()
    X, Y, b = _check(X, Y, bias)
    m, k = Y.shape[0], X.shape[0]
    Xn, Yn, bn = X.numpy(), Y.numpy(), b.numpy()
    pos = _positive_mask(Y, b, activation).numpy()
    U = cp.Variable((m, k))
    Z = U @ Xn
    cons = []
    if pos.any():
        cons.append(cp.norm(cp.multiply(pos.astype(float), Z - Yn), "fro") <= eps)
    if (~pos).any():
        cons.append(cp.multiply((~pos).astype(float), Z + bn[:, None]) <= 0)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    obj = cp.normNuc(U) if objective == "nuclear" else cp.sum(cp.abs(U))
    prob = cp.Problem(cp.Minimize(obj), cons)
    try:
        prob.solve(solver=cp.SCS, max_iters=max_iter, eps_abs=tol, eps_rel=tol, verbose=verbose)
    except cp.error.SolverError as e:  # pragma: no cover - depends on the SCS build
        raise RankslimError(f"SCS failed on the DDLR problem ({e}); use solver='admm'") from e
    if U.value is None or prob.status not in ("optimal", "optimal_inaccurate"):
        raise RankslimError(f"SCS returned status {prob.status!r} for the DDLR problem; use solver='admm'")
    Uv = torch.from_numpy(np.asarray(U.value, dtype=np.float64))
    sigma = torch.linalg.svdvals(Uv)
    err, viol = ddlr_violation(Uv, X, Y, b, activation)
    iters = int(prob.solver_stats.num_iters or 0) if prob.solver_stats is not None else 0
    return DDLRResult(Uv, sigma, _objective(Uv, objective), float(eps), err, viol, "scs", iters,
                      prob.status == "optimal", time.perf_counter() - t0)


DDLR_SOLVERS = ("auto", "cvxpy", "admm")


def choose_ddlr_solver(m: int, k: int, n: int, solver: str = "auto") -> str:
    """``"cvxpy"`` for small problems (see :data:`CVXPY_MAX_SIDE`), ``"admm"`` otherwise; or ``solver`` if forced."""
    if solver not in DDLR_SOLVERS:
        raise ValueError(f"unknown DDLR solver {solver!r}; use one of {', '.join(DDLR_SOLVERS)}")
    if solver != "auto":
        return solver
    return "cvxpy" if (m + k <= CVXPY_MAX_SIDE and m * k * n <= CVXPY_MAX_ENTRIES) else "admm"


def ddlr(
    X: torch.Tensor,
    Y: torch.Tensor,
    bias: torch.Tensor | None,
    eps_rel: float,
    *,
    W: torch.Tensor | None = None,
    solver: str = "auto",
    activation: str = "relu",
    **solver_options,
) -> DDLRResult:
    """DDLR for one layer: problem (4) with ``eps = eps_rel * ||X||_F``, solver picked by size.

    ``X: (k, n)`` inputs, ``Y: (m, n)`` original pre-bias outputs, ``bias: (m,)``; ``W: (m, k)``
    the original weight (warm start of the ADMM).  ``solver``: "auto" | "cvxpy" | "admm"; extra
    keyword options go to the chosen solver.
    """
    eps = ddlr_epsilon(X, eps_rel)
    which = choose_ddlr_solver(Y.shape[0], X.shape[0], X.shape[1], solver)
    if which == "cvxpy":
        return ddlr_cvxpy(X, Y, bias, eps, activation=activation, **solver_options)
    return ddlr_admm(X, Y, bias, eps, U0=W, activation=activation, **solver_options)


__all__ = ["ACTIVATIONS", "OBJECTIVES", "DDLRResult", "ddlr", "ddlr_admm", "ddlr_cvxpy", "ddlr_epsilon", "ddlr_violation", "elbow_rank",
           "choose_ddlr_solver", "DDLR_SOLVERS", "CVXPY_MAX_SIDE", "CVXPY_MAX_ENTRIES"]
