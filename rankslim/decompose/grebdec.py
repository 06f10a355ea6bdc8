"""GreBdec (Yu, Liu, Wang & Tao, CVPR 2017): data-aware low-rank + sparse by greedy bilateral decomposition.

Objective (4), from the calibration sums (``A = XXᵀ/n + λI``, ``N = YXᵀ/n + λW``)::

    F(U, V, S) = 1/(2n) ‖Y − (UV + S) X‖_F² + λ/2 ‖W − UV − S‖_F²,   card(S) ≤ c,
               = ½⟨Ŵ A, Ŵ⟩ − ⟨Ŵ, N⟩ + const   with Ŵ = UV + S,

``λ = 10^t · σ_max(XXᵀ/n)`` (section 6), ``η = 1e-3`` (section 6).  Algorithm 1:

1. repeat ``K + 1`` times the QR update (7): ``B = λ(W − S) + (YXᵀ − S XXᵀ)/n = N − S A``,
   ``Q R = qr(B Vᵀ)``, ``U = Q``, ``V = Qᵀ (B A⁻¹)``.  (``B A⁻¹ = N A⁻¹ − S``, precomputed.)
2. S-step (5): ``S = P_Ω(S − η (Ŵ A − N))`` — the gradient of (4) in ``S`` is ``(UV + S) A − N``
   (the paper prints ``A S``; ``A`` is k×k and multiplies from the right).
3. greedy rank growth (8): append ``Δr`` rows to ``V``: an orthonormal basis of the random
   projection ``Rᵀ G`` (``R``: Gaussian, one power step) of the gradient ``G = Ŵ A − N``.

Where we differ from the paper, and why:

* Rank growth projects the gradient ``G`` itself (as GreBsmo does).  The paper's literal
  ``Uᵀ G`` is identically zero right after update (7): ``V = Qᵀ B A⁻¹`` gives
  ``Ŵ A − N = −(I − QQᵀ) B``, whose projection on ``Q`` vanishes.
* ``S₀ = P_Ω(N A⁻¹ − U₀V₀)`` after the first QR update (Algorithm 1 leaves S₀ open; from zero S
  would grow only by η-sized steps).  The objective is recorded from there on.
* IHT with a small step keeps its support: started while ``UV`` has rank 1, S locks onto entries
  that the later rank-r part explains (on planted problems it then stalls at a wrong support).
  So each S step also evaluates the candidate ``P_Ω(N A⁻¹ − UV)`` (GoDec's exact S step in the
  identity metric) and keeps whichever of the two lowers (4) more (``restart=True``; the count
  is reported as ``restarts``).  Descent is preserved since step (5) alone already descends.
* The S step is ``min(η, 1/σ_max(A))`` so it provably decreases (4) (reported as ``eta_used``);
  ``eta="auto"`` takes ``1/σ_max(A)``.  On ResNet-20's layers ``1/σ_max(A)`` is 30–50× the
  paper's η = 1e-3, which then converges slowly (see docs/methods/data-aware.md).
* After the rank reaches ``r`` the loop continues (fixed rank) until the relative change of F is
  below ``tol`` or ``max_iter`` outer iterations ran.

Every step decreases (4): (7) is the exact minimiser over U given V followed by the exact V for
that column space (a larger column space after growth can only help), and the S step is a
majorise-minimise step for ``η ≤ 1/σ_max(A)``.

:func:`gsvd_lowrank_sparse` is the slower alternating solver of eq. (3) (truncated generalised
SVD for L, one SVD per iteration), kept as the reference the paper compares speed against.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import RankError
from ..linalg import range_finder
from .prune import DataTerms, hard_threshold

#: use a sparse (CSR) product for ``S @ A`` when S has at most this density and this many entries
SPARSE_DENSITY = 0.25
SPARSE_MIN_ENTRIES = 1_000_000


def _step(eta: float | str, lipschitz: float) -> float:
    """The S step: ``min(η, 1/σ_max(A))``; ``η = "auto"`` gives ``1/σ_max(A)``, the largest step with guaranteed descent."""
    safe = 1.0 / lipschitz if lipschitz > 0 else 1.0
    if eta == "auto":
        return safe
    return min(float(eta), safe)


def _times_A(S: torch.Tensor, mask: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``S @ A`` exploiting the sparsity of ``S`` for big, sparse matrices (``c·k`` instead of ``m·k²``)."""
    nnz = int(mask.sum())
    if nnz == 0:
        return torch.zeros(S.shape[0], A.shape[1], dtype=S.dtype, device=S.device)
    if S.numel() >= SPARSE_MIN_ENTRIES and nnz <= SPARSE_DENSITY * S.numel():
        with warnings.catch_warnings():  # torch flags CSR tensors as beta; the product itself is plain
            warnings.simplefilter("ignore", UserWarning)
            return S.to_sparse_csr() @ A
    return S @ A


@dataclass
class LowRankSparseResult:
    """``Ŵ = U @ V + S``: ``U: (m, r)``, ``V: (r, k)``, ``S: (m, k)`` zero outside ``mask``.

    ``objective``: value of (4) after every outer iteration; ``ranks``: rank of ``UV`` at each;
    ``times``: seconds since the call started at each recorded objective; ``lam``, ``eta_used``,
    ``iterations``, ``seconds`` (total); ``info``: extra solver facts (JSON-able).
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    objective: list[float]
    ranks: list[int]
    lam: float
    eta_used: float
    iterations: int
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)


def grebdec(W: torch.Tensor, XX: torch.Tensor, YX: torch.Tensor, n: int, rank: int, card: int, *,
            yy: float = 0.0, t: float = -2.0, eta: float | str = 1e-3, K: int = 2, delta_r: int | None = None,
            r0: int = 1, max_iter: int = 30, tol: float = 1e-5, restart: bool = True,
            generator: torch.Generator | None = None) -> LowRankSparseResult:
    """Algorithm 1 of GreBdec: ``W: (m, k) ≈ U V + S`` with ``rank(UV) = rank`` and ``card(S) ≤ card``.

    ``XX: (k, k)``, ``YX: (m, k)``, ``n``, ``yy``: calibration sums (``Σ x xᵀ``, ``Σ y xᵀ``, columns,
    ``Σ‖y‖²`` — ``yy`` only shifts the recorded objective).  ``t``: λ = 10^t·σ_max(XX/n);
    ``eta``: S step (capped at 1/σ_max(A); "auto" = 1/σ_max(A)); ``K``: QR updates are repeated ``K + 1`` times;
    ``delta_r``: rank step (default ``ceil(rank/8)``); ``r0``: initial rank; ``restart``: also try
    ``P_Ω(N A⁻¹ − UV)`` at every S step and keep it when it lowers (4) more than step (5).
    """
    t_start = time.perf_counter()
    W = W.to(torch.float64)
    m, k = W.shape
    if not 1 <= rank <= min(m, k):
        raise RankError(f"rank {rank} is impossible for a {m}x{k} matrix: use 1..{min(m, k)} "
                        "(rank 0 is the sparse-only model: use iht_prune)")
    if card < 0:
        raise RankError(f"cardinality must be >= 0, got {card}")
    if K < 0 or max_iter < 1:
        raise RankError("K must be >= 0 and max_iter >= 1")
    gen = generator or torch.Generator().manual_seed(0)
    terms = DataTerms.build(W, XX, YX, n, t, yy, generator=gen)
    A, N = terms.A, terms.N
    Lip = terms.smax + terms.lam
    eta_used = _step(eta, Lip)
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # λ = 0 on singular data: fall back to a tiny explicit damping
        eps = 1e-10 * max(Lip, 1e-300)
        chol = torch.linalg.cholesky(A + eps * torch.eye(k, dtype=A.dtype, device=A.device))
    W_star = torch.cholesky_solve(N.T.contiguous(), chol).T  # N A⁻¹: the unconstrained optimum
    delta_r = max(1, math.ceil(rank / 8)) if delta_r is None else int(delta_r)
    r_cur = max(1, min(int(r0), rank))

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(W.device)

    V = torch.linalg.qr(rand(k, r_cur))[0].T  # V₀: random orthonormal rows
    S = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    SA = torch.zeros_like(W)
    U = W.new_zeros(m, r_cur)
    obj: list[float] = []
    ranks: list[int] = []
    restarts = 0
    times: list[float] = []
    it = 0
    for it in range(1, max_iter + 1):
        # (7), K + 1 times: U = orth(B Vᵀ), V = Uᵀ (B A⁻¹) with B = N − S A and B A⁻¹ = W* − S
        G = W_star - S
        for _ in range(K + 1):
            BVt = N @ V.T - SA @ V.T
            U, _ = torch.linalg.qr(BVt)
            V = U.T @ G
        VA = V @ A
        L = U @ V
        LA = U @ VA
        # candidate 1, the projected gradient step (5); candidate 2 (``restart``, and always at it == 1: S₀),
        # the c best entries of the residual of the unconstrained optimum, P_Ω(N A⁻¹ − UV)
        cands = []
        if it > 1:
            S1, m1 = hard_threshold(S - eta_used * (LA + SA - N), card)
            cands.append((S1, m1))
        if it == 1 or restart:
            cands.append(hard_threshold(W_star - L, card))
        best = None
        for S_c, m_c in cands:
            SA_c = _times_A(S_c, m_c, A)
            f = terms.objective(L + S_c, LA + SA_c)
            if best is None or f < best[0]:
                best = (f, S_c, m_c, SA_c)
        f, S, mask, SA = best
        restarts += int(it > 1 and len(cands) == 2 and S is cands[1][0])
        WA = LA + SA
        obj.append(f)
        times.append(time.perf_counter() - t_start)
        ranks.append(int(U.shape[1]))
        if r_cur < rank:
            # (8): grow V by Δr rows spanning the top right-singular directions of the gradient
            dr = min(delta_r, rank - r_cur)
            grad = WA - N
            # orth(Gᵀ G Gᵀ Ω): k × Δr, the one power step sharpens the subspace
            v = range_finder(grad.T, dr, passes=3, generator=gen, reorthogonalize=False).T
            V = torch.cat([V, v], 0)
            r_cur += dr
        elif len(obj) > 1 and abs(obj[-2] - obj[-1]) <= tol * max(abs(obj[-1]), 1e-300):
            break
    if r_cur > U.shape[1]:  # max_iter reached while growing: finish the last (7) update at full rank
        G = W_star - S
        for _ in range(K + 1):
            U, _ = torch.linalg.qr(N @ V.T - SA @ V.T)
            V = U.T @ G
        obj.append(terms.objective(U @ V + S))
        ranks.append(int(U.shape[1]))
        times.append(time.perf_counter() - t_start)
    return LowRankSparseResult(U, V, S, mask, obj, ranks, terms.lam, eta_used, it,
                               time.perf_counter() - t_start,
                               {"delta_r": delta_r, "K": K, "r0": r0, "t": t, "eta": eta,
                                "sigma_max": terms.smax, "restarts": restarts}, times)


def gsvd_lowrank_sparse(W: torch.Tensor, XX: torch.Tensor, YX: torch.Tensor, n: int, rank: int, card: int, *,
                        yy: float = 0.0, t: float = -2.0, eta: float | str = 1e-3, max_iter: int = 10, tol: float = 1e-5,
                        svd_solver: str = "exact", generator: torch.Generator | None = None) -> LowRankSparseResult:
    """The alternating solver of GreBdec eq. (3): ``L = TruncatedGSVD(B A⁻¹, r)``, ``S = P_Ω(S − η(Ŵ A − N))``.

    Same objective and arguments as :func:`grebdec`.  With the Cholesky factor ``A = R Rᵀ`` the
    L-step is ``L = [B R^{-T}]_r R^{-1}`` (the minimiser of ``‖(L − B A⁻¹) R‖_F``): two triangular
    solves and one truncated SVD of an ``m×k`` matrix per iteration — the cost GreBdec was designed
    to avoid.  ``svd_solver``: "exact" (LAPACK) or "randomized" / "gram" / "auto" (see
    :func:`rankslim.decompose.svd.truncated_svd`).  S₀ = ``P_Ω(N A⁻¹ − L₁)``.
    """
    from .svd import truncated_svd

    t_start = time.perf_counter()
    W = W.to(torch.float64)
    m, k = W.shape
    if not 1 <= rank <= min(m, k):
        raise RankError(f"rank {rank} is impossible for a {m}x{k} matrix: use 1..{min(m, k)}")
    gen = generator or torch.Generator().manual_seed(0)
    terms = DataTerms.build(W, XX, YX, n, t, yy, generator=gen)
    A, N = terms.A, terms.N
    Lip = terms.smax + terms.lam
    eta_used = _step(eta, Lip)
    R, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        R = torch.linalg.cholesky(A + 1e-10 * max(Lip, 1e-300) * torch.eye(k, dtype=A.dtype, device=A.device))
    S = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    SA = torch.zeros_like(W)
    obj: list[float] = []
    times: list[float] = []
    it = 0
    U = V = None
    for it in range(1, max_iter + 1):
        B = N - SA
        Z = torch.linalg.solve_triangular(R, B.T, upper=False).T          # B R^{-T}
        f = truncated_svd(Z, rank, solver=svd_solver, generator=gen)
        U = f.U.to(torch.float64)
        V = torch.linalg.solve_triangular(R.T, f.V.to(torch.float64).T, upper=True).T  # [·]_r R^{-1}
        L = U @ V
        LA = U @ (V @ A)
        if it == 1:
            S, mask = hard_threshold(torch.cholesky_solve(N.T.contiguous(), R).T - L, card)
        else:
            S, mask = hard_threshold(S - eta_used * (LA + SA - N), card)
        SA = _times_A(S, mask, A)
        obj.append(terms.objective(L + S, LA + SA))
        times.append(time.perf_counter() - t_start)
        if len(obj) > 1 and abs(obj[-2] - obj[-1]) <= tol * max(abs(obj[-1]), 1e-300):
            break
    return LowRankSparseResult(U, V, S, mask, obj, [rank] * len(obj), terms.lam, eta_used, it,
                               time.perf_counter() - t_start, {"t": t, "eta": eta, "svd_solver": svd_solver}, times)


__all__ = ["grebdec", "gsvd_lowrank_sparse", "LowRankSparseResult"]
