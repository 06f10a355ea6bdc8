"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, vectorised in PyTorch.

Lebedev et al. (ICLR 2015) approximate a conv kernel ``K: (N, C, kh, kw)`` by a rank-``R`` CP

    K[t, s, i, j] = sum_r lambda_r K^t[t, r] K^s[s, r] K^y[i, r] K^x[j, r]

and run it as 1x1 (C -> R), kh x 1 depthwise, 1 x kw depthwise, 1x1 (R -> N).  They fit the CP
by non-linear least squares (Gauss-Newton); we fit it by the classic ALS (Carroll & Chang 1970;
Kolda & Bader 2009, Alg. 3.1), the method TensorLy's ``parafac`` also uses:

    A_k <- X_(k) (odot_{j != k} A_j) (circledast_{j != k} A_j^T A_j)^{-1}

where ``X_(k) (odot ...)`` is the MTTKRP.  We never form the Khatri-Rao product: the MTTKRP is a
chain of two-operand contractions, largest mode first, so its peak intermediate is
``numel / I_max * R`` numbers instead of ``numel / I_k * R``.  The normal equations are solved with
an explicit Tikhonov damping ``damping * trace(V) / R`` (reported).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import torch

from ..errors import RankError

#: default ceiling on the memory a CP-ALS run may allocate (bytes); see :func:`cp_als_bytes`
DEFAULT_MAX_BYTES = 2 * 1024 ** 3


@dataclass
class CPResult:
    """``weights: (R,)`` and unit-column ``factors[k]: (I_k, R)``; the tensor is ``sum_r w_r a_1r o ... o a_dr``.

    ``rel_error``: ``||T - T_hat||_F / ||T||_F`` after the last sweep; ``errors``: that value per
    sweep; ``n_iter``: sweeps run; ``damping``: the ridge added to the normal equations.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel_error: float
    n_iter: int
    errors: list[float] = field(default_factory=list)
    damping: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.weights.shape[0])


def cp_to_tensor(weights: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor ``(I_1, ..., I_d)`` of a CP model (``weights: (R,)``, ``factors[k]: (I_k, R)``).

    Computed as ``(A_1 * w) @ KhatriRao(A_2, ..., A_d)^T``: the peak intermediate is
    ``(I_2 ... I_d) x R`` numbers (a many-operand einsum can materialise ``I_1 I_2 ... x R``).
    """
    R = weights.shape[0]
    kr = factors[-1]
    for A in reversed(factors[1:-1]):
        kr = (A[:, None, :] * kr[None, :, :]).reshape(-1, R)
    full = (factors[0] * weights) @ kr.T
    return full.reshape(*(int(A.shape[0]) for A in factors))


def cp_als_bytes(shape: tuple[int, ...], rank: int, itemsize: int = 8) -> int:
    """Upper estimate of the bytes :func:`cp_als` allocates for a tensor of ``shape`` at ``rank``.

    The tensor (float64 copy), the first MTTKRP intermediate ``numel / I_max * R`` (twice, for the
    next step), the factors and the ``R x R`` Gram matrices.
    """
    numel = math.prod(shape)
    dims = sorted(shape, reverse=True)
    # the MTTKRP for the largest mode contracts the second largest first
    second = dims[1] if len(dims) > 1 else 1
    inter = numel // max(second, 1) * rank
    factors = sum(shape) * rank * 3
    grams = len(shape) * rank * rank * 2
    return itemsize * (2 * numel + 2 * inter + factors + grams)


def _mttkrp(T: torch.Tensor, factors: list[torch.Tensor], k: int) -> torch.Tensor:
    """``X_(k) (Khatri-Rao of the other factors)``: ``(I_k, R)``, without forming the Khatri-Rao product."""
    d = T.dim()
    letters = string.ascii_lowercase[:d]
    others = sorted((j for j in range(d) if j != k), key=lambda j: -T.shape[j])
    j0 = others[0]
    # contract the largest other mode first: the intermediate is as small as it can be
    rest = "".join(c for i, c in enumerate(letters) if i != j0)
    X = torch.einsum(f"{letters},{letters[j0]}z->{rest}z", T, factors[j0])
    for j in others[1:]:
        rest2 = rest.replace(letters[j], "")
        X = torch.einsum(f"{rest}z,{letters[j]}z->{rest2}z", X, factors[j])
        rest = rest2
    return X  # rest == letters[k]


def _init_factors(T: torch.Tensor, rank: int, init: str, generator: torch.Generator | None) -> list[torch.Tensor]:
    factors = []
    for k in range(T.dim()):
        I = T.shape[k]
        if init == "svd":
            unf = T.movedim(k, 0).reshape(I, -1)
            U, S, _ = torch.linalg.svd(unf, full_matrices=False)
            A = U[:, :rank] * S[: min(rank, S.numel())]
            if rank > A.shape[1]:
                # more components than the mode has dimensions: fill with random columns
                extra = torch.randn(I, rank - A.shape[1], generator=generator, dtype=T.dtype)
                A = torch.cat([A, extra * (S[0] / math.sqrt(I) if S.numel() else 1.0)], 1)
        elif init == "random":
            A = torch.randn(I, rank, generator=generator, dtype=T.dtype)
        else:
            raise ValueError(f"unknown CP init {init!r}; use 'svd' or 'random'")
        factors.append(A)
    return factors


def cp_als(
    T: torch.Tensor,
    rank: int,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    init: str = "svd",
    damping: float = 1e-12,
    generator: torch.Generator | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    init_factors: list[torch.Tensor] | None = None,
) -> CPResult:
    """Rank-``rank`` CP of ``T: (I_1, ..., I_d)`` (d >= 2) by ALS in float64.

    ``n_iter_max`` sweeps at most; stops early when the relative error changes by less than
    ``tol`` between sweeps (``tol=0`` runs every sweep).  ``init``: "svd" (leading singular vectors
    of each unfolding, random columns where ``rank`` exceeds a mode) or "random"; ``init_factors``
    overrides it.  ``max_bytes``: refuse with :class:`RankError` when :func:`cp_als_bytes` exceeds
    it (``None``: no limit).  Returns a :class:`CPResult` in ``T``'s dtype.
    """
    if T.dim() < 2:
        raise ValueError(f"CP needs a tensor of order >= 2, got shape {tuple(T.shape)}")
    if rank < 1:
        raise RankError(f"CP rank must be >= 1, got {rank}")
    need = cp_als_bytes(tuple(T.shape), rank)
    if max_bytes is not None and need > max_bytes:
        raise RankError(
            f"CP-ALS of a {'x'.join(map(str, T.shape))} tensor at rank {rank} would allocate about "
            f"{need / 2**30:.2f} GiB (limit {max_bytes / 2**30:.2f} GiB); lower the rank, raise the limit "
            "(method_options={'max_bytes': ...}) or use the 'tucker' or 'svd' method for this layer"
        )
    X = T.detach().to(torch.float64)
    norm_sq = float(X.square().sum())
    norm = math.sqrt(norm_sq) or 1.0
    if init_factors is not None:
        factors = [f.detach().to(torch.float64).clone() for f in init_factors]
    else:
        factors = _init_factors(X, rank, init, generator)
    d = X.dim()
    weights = torch.ones(rank, dtype=torch.float64)
    grams = [A.T @ A for A in factors]
    errors: list[float] = []
    eye = torch.eye(rank, dtype=torch.float64)
    ridge_used = 0.0
    it = 0
    for it in range(1, n_iter_max + 1):
        for k in range(d):
            V = torch.ones(rank, rank, dtype=torch.float64)
            for j in range(d):
                if j != k:
                    V = V * grams[j]
            M = _mttkrp(X, factors, k)
            ridge = damping * float(torch.diagonal(V).sum()) / rank
            ridge_used = max(ridge_used, ridge)
            A = torch.linalg.solve(V + ridge * eye, M.T).T
            # the scale lives in ``weights``; factors keep unit columns for conditioning
            lam = torch.linalg.vector_norm(A, dim=0)
            lam_safe = torch.where(lam > 0, lam, torch.ones_like(lam))
            factors[k] = A / lam_safe
            weights = lam
            grams[k] = factors[k].T @ factors[k]
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2, from the last MTTKRP and the Grams
        inner = float((M * factors[k]).sum(0) @ weights)
        G = torch.ones(rank, rank, dtype=torch.float64)
        for g in grams:
            G = G * g
        fit_sq = float(weights @ G @ weights)
        err = math.sqrt(max(norm_sq - 2 * inner + fit_sq, 0.0)) / norm
        errors.append(err)
        if it > 1 and abs(errors[-2] - err) < tol:
            break
    dt = T.dtype
    return CPResult(weights.to(dt), [A.to(dt).contiguous() for A in factors], errors[-1], it, errors, ridge_used)


__all__ = ["CPResult", "cp_als", "cp_to_tensor", "cp_als_bytes", "DEFAULT_MAX_BYTES"]
