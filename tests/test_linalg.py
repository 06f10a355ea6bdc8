"""rankslim.linalg: each shared numeric kernel against torch.linalg on random and rank-deficient matrices."""
from __future__ import annotations

import pytest
import torch

from rankslim.linalg import gram_svd, psd_factor, psd_inv_sqrt, psd_sqrt, psd_sqrt_inv_sqrt, range_finder, svt

F64 = torch.float64


def _low_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)


def _random(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


MATRICES = {
    "wide": lambda: _random(7, 19),
    "tall": lambda: _random(23, 6),
    "wide rank 3": lambda: _low_rank(9, 20, 3),
    "tall rank 2": lambda: _low_rank(30, 8, 2),
    "zero": lambda: torch.zeros(5, 4, dtype=F64),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_gram_svd_matches_lapack(name):
    W = MATRICES[name]()
    s_ref = torch.linalg.svdvals(W)
    r = min(W.shape)
    U, S, Vh = gram_svd(W)
    # Gram route: absolute error ~ eps * s_max^2 / s, so compare on the scale of s_max
    scale = max(float(s_ref[0]), 1.0)
    torch.testing.assert_close(S, s_ref, rtol=0, atol=1e-7 * scale)
    assert U.shape == (W.shape[0], r) and Vh.shape == (r, W.shape[1])
    # the full product reconstructs W, and every truncation is as good as LAPACK's (Eckart-Young)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, rtol=0, atol=1e-9 * scale)
    for k in range(1, r + 1):
        Uk, Sk, Vhk = gram_svd(W, k)
        err = float(torch.linalg.matrix_norm(W - (Uk * Sk) @ Vhk))
        best = float(s_ref[k:].square().sum().sqrt())
        assert err <= best + 1e-7 * scale


def test_gram_svd_partial_outputs_agree_with_full():
    for W in (_random(6, 15), _random(15, 6), _low_rank(12, 10, 4)):
        U, S, Vh = gram_svd(W, 3)
        U_only = gram_svd(W, 3, right=False)
        V_only = gram_svd(W, 3, left=False)
        vals = gram_svd(W, 3, left=False, right=False)
        assert U_only[2] is None and V_only[0] is None and vals[0] is None and vals[2] is None
        torch.testing.assert_close(U_only[0], U)
        torch.testing.assert_close(V_only[2], Vh)
        torch.testing.assert_close(vals[1], torch.linalg.svdvals(W)[:3], rtol=1e-9, atol=1e-9)


def _svt_reference(A: torch.Tensor, tau: float) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return (U * (s - tau).clamp_min(0)) @ Vh


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_svt_matches_svd_thresholding(name):
    A = MATRICES[name]()
    s = torch.linalg.svdvals(A)
    for tau in (0.0, 0.5 * float(s[0]) + 1e-3, 2.0 * float(s[0]) + 1.0):
        out = svt(A, tau)
        torch.testing.assert_close(out, _svt_reference(A, tau), rtol=0, atol=1e-8 * max(float(s[0]), 1.0))
        assert out.shape == A.shape and out.dtype == A.dtype
    # threshold between singular values: the rank drops to the count above it
    if float(s[0]) > 0:
        tau = float(s[0] + s[1]) / 2
        assert int(torch.linalg.matrix_rank(svt(A, tau))) == 1


def _planted(m: int, n: int, top: list[float], tail: float, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with the given leading singular values and a flat tail of ``tail``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0]
    s = torch.tensor(top + [tail] * (k - len(top)), dtype=F64)
    return (U * s) @ V.T


@pytest.mark.parametrize("m,n", [(12, 40), (40, 12)])
def test_range_finder_captures_the_dominant_subspace(m, n):
    W = _planted(m, n, [10.0, 8.0], 0.3)
    top = float(torch.linalg.svdvals(W)[:2].square().sum())
    for passes, reorth in ((1, True), (5, True), (4, False), (3, False)):
        Q = range_finder(W, 2, passes=passes, generator=torch.Generator().manual_seed(3), reorthogonalize=reorth)
        assert Q.shape == ((m if passes % 2 else n), 2)
        torch.testing.assert_close(Q.T @ Q, torch.eye(2, dtype=F64), rtol=0, atol=1e-10)
        # energy of W inside span(Q): never above the top-2 energy (Ky Fan), and close to it, closer with passes
        kept = float((Q.T @ W if passes % 2 else W @ Q).square().sum())
        assert kept <= top * (1 + 1e-12)
        assert kept >= (0.9 if passes == 1 else 0.999) * top


def test_range_finder_is_exact_on_rank_deficient_input():
    W = _low_rank(40, 30, 3, seed=5)
    Q = range_finder(W, 3, passes=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Q @ (Q.T @ W), W, rtol=0, atol=1e-9 * float(torch.linalg.matrix_norm(W)))


def test_range_finder_is_seeded():
    W = _random(10, 8)
    a = range_finder(W, 3, passes=3, generator=torch.Generator().manual_seed(7))
    b = range_finder(W, 3, passes=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_psd_sqrt_inv_sqrt_against_eigen_and_matrix_power():
    B = _random(6, 9)
    A = B @ B.T + 0.1 * torch.eye(6, dtype=F64)  # SPD
    root, iroot = psd_sqrt_inv_sqrt(A, damping=0.0)
    torch.testing.assert_close(root @ root, A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(iroot, torch.linalg.inv(root), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(iroot @ A @ iroot, torch.eye(6, dtype=F64), rtol=0, atol=1e-9)
    assert root.dtype == F64
    torch.testing.assert_close(root, root.T, rtol=0, atol=1e-12)


def test_psd_sqrt_inv_sqrt_damps_singular_matrices():
    B = _low_rank(8, 8, 3, seed=2)
    A = (B @ B.T).float()  # rank 3, float32 in: the result is float64
    damping = 1e-6
    root, iroot = psd_sqrt_inv_sqrt(A, damping=damping)
    assert root.dtype == F64 and torch.isfinite(iroot).all()
    lam_max = float(torch.linalg.eigvalsh(A.double())[-1])
    # the null space is raised to the floor damping * lam_max, exactly as documented
    floor = damping * lam_max
    ev_inv = torch.linalg.eigvalsh(iroot)
    torch.testing.assert_close(ev_inv.max(), torch.tensor(floor ** -0.5, dtype=F64), rtol=1e-6, atol=0)
    # on the range of A the square root is exact
    torch.testing.assert_close(root @ root, A.double(), rtol=0, atol=1e-4 * lam_max)
    with pytest.raises(ValueError):
        psd_sqrt_inv_sqrt(A, damping=-1.0)


def test_single_root_helpers_equal_the_pair():
    B = _low_rank(7, 7, 4, seed=3)
    A = B @ B.T
    root, iroot = psd_sqrt_inv_sqrt(A, damping=1e-8)
    assert torch.equal(psd_sqrt(A, damping=1e-8), root)
    assert torch.equal(psd_inv_sqrt(A, damping=1e-8), iroot)
    with pytest.raises(ValueError):
        psd_inv_sqrt(A, damping=-1.0)


def _spd(k: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(k, rank or 3 * k, generator=g, dtype=torch.float64)
    return X @ X.T


def test_psd_factor_cholesky_products_match_the_explicit_roots():
    A = _spd(12)
    f = psd_factor(A, 0.0)
    assert f.cholesky and torch.allclose(f.tri, torch.tril(f.tri))
    M = torch.randn(5, 12, dtype=torch.float64)
    root, iroot = psd_sqrt_inv_sqrt(A, damping=0.0)
    # F = A^{1/2} O with O orthogonal: same Gram matrices and singular values as the symmetric roots
    assert torch.allclose(f.times(M) @ f.times(M).T, M @ A @ M.T, rtol=1e-10, atol=1e-8)
    assert torch.allclose(torch.linalg.svdvals(f.times(M)), torch.linalg.svdvals(M @ root), rtol=1e-10)
    assert torch.allclose(f.solve_t(M) @ f.solve_t(M).T, M @ torch.linalg.inv(A) @ M.T, rtol=1e-8, atol=1e-10)
    assert torch.allclose(f.solve(f.times(M)), M, atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(f.solve_t(M)), torch.linalg.svdvals(M @ iroot), rtol=1e-8)


def test_psd_factor_leaves_a_tensor_alone_and_may_overwrite_a_fresh_one():
    A = _spd(8)
    before = A.clone()
    psd_factor(A, 1e-12)
    assert torch.equal(A, before)
    made = []

    def fresh():
        made.append(A.clone())
        return made[-1]

    f = psd_factor(fresh, 1e-12)
    assert len(made) == 1 and f.cholesky
    assert torch.allclose(made[0], f.tri)  # the factor lives in the fresh matrix's storage


def test_psd_factor_falls_back_to_eigh_on_singular_matrices():
    A = _spd(10, rank=4)  # rank 4: Cholesky breaks down without damping
    calls = []

    def fresh():
        calls.append(1)
        return A.clone()

    f = psd_factor(fresh, 0.0)
    assert not f.cholesky and len(calls) == 2  # rebuilt once for eigh after the failed Cholesky
    M = torch.randn(3, 10, dtype=torch.float64)
    assert torch.allclose(f.times(M) @ f.times(M).T, M @ A @ M.T, atol=1e-8)
    # with damping the same matrix factorizes by Cholesky, as A + δI
    g = psd_factor(A, 1e-6)
    top = float(torch.linalg.eigvalsh(A)[-1])
    assert g.cholesky and torch.allclose(g.tri @ g.tri.T, A + 1e-6 * top * torch.eye(10, dtype=torch.float64), atol=1e-8)
    with pytest.raises(ValueError):
        psd_factor(A, -1.0)
