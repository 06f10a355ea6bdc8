"""Data-aware low rank in closed form (truncated generalised SVD)."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.zhang import truncated_gsvd, zhang_lowrank
from rankslim.errors import RankError

from ._planted import planted


def _data_err(W, X, Y):
    return float(((Y - W @ X) ** 2).sum())


def test_white_inputs_reduce_to_truncated_svd():
    torch.manual_seed(0)
    W = torch.randn(10, 12, dtype=torch.float64)
    n = 5
    XX = n * torch.eye(12, dtype=torch.float64)
    res = zhang_lowrank(W, XX, W @ XX, n, 4, damping=0.0)
    U, s, Vh = torch.linalg.svd(W)
    assert torch.allclose(res.U @ res.V, (U[:, :4] * s[:4]) @ Vh[:4], atol=1e-9)


def test_beats_svd_and_random_candidates_on_the_data():
    p = planted(r=6, noise=0.3)
    X = p["X"] * torch.linspace(0.05, 2.0, p["X"].shape[0], dtype=torch.float64)[:, None]
    Y = p["W"] @ X
    res = zhang_lowrank(p["W"], X @ X.T, Y @ X.T, p["n"], 3, yy=float((Y * Y).sum()), damping=0.0)
    L = res.U @ res.V
    assert torch.linalg.matrix_rank(L) == 3
    U, s, Vh = torch.linalg.svd(p["W"])
    L_svd = (U[:, :3] * s[:3]) @ Vh[:3]
    assert _data_err(L, X, Y) < _data_err(L_svd, X, Y)
    assert res.relative_error < res.svd_relative_error
    g = torch.Generator().manual_seed(1)
    for _ in range(10):  # small rank-preserving perturbations of the optimum never help
        dU = 1e-2 * torch.randn(res.U.shape, generator=g, dtype=torch.float64)
        dV = 1e-2 * torch.randn(res.V.shape, generator=g, dtype=torch.float64)
        assert _data_err((res.U + dU) @ (res.V + dV), X, Y) >= _data_err(L, X, Y) - 1e-9


def test_full_rank_recovers_weights_and_damping_pulls_to_w():
    p = planted()
    res = zhang_lowrank(p["W"], p["XX"], p["YX"], p["n"], 30, damping=0.0)
    assert torch.allclose(res.U @ res.V, p["W"], atol=1e-6)
    # singular inputs: without damping the unseen directions are arbitrary (pseudo-inverse -> 0), with damping W is kept
    X = p["X"].clone()
    X[:5] = 0
    Y = p["W"] @ X
    d = zhang_lowrank(p["W"], X @ X.T, Y @ X.T, p["n"], 30, damping=1e-3)
    assert torch.allclose((d.U @ d.V)[:, :5], p["W"][:, :5], atol=1e-6)


def test_truncated_gsvd_rank_checks():
    with pytest.raises(RankError):
        truncated_gsvd(torch.randn(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 4)


def test_solution_equals_the_symmetric_root_formula():
    """The Cholesky route gives L = [B A^{-1/2}]_r A^{-1/2}, computed here from eigh independently."""
    p = planted(r=6, noise=0.3)
    X = p["X"] * torch.linspace(0.05, 2.0, p["X"].shape[0], dtype=torch.float64)[:, None]
    Y = p["W"] @ X + 0.1 * torch.randn(p["W"].shape[0], X.shape[1], dtype=torch.float64)
    n, lam_rel = p["n"], 1e-3
    res = zhang_lowrank(p["W"], X @ X.T, Y @ X.T, n, 4, yy=float((Y * Y).sum()), damping=lam_rel)
    C = X @ X.T / n
    lam = lam_rel * float(torch.linalg.eigvalsh(C)[-1])
    ev, Q = torch.linalg.eigh(C + lam * torch.eye(C.shape[0], dtype=torch.float64))
    iroot = (Q * ev.rsqrt()) @ Q.T
    U, s, Vh = torch.linalg.svd((Y @ X.T / n + lam * p["W"]) @ iroot)
    L = (U[:, :4] * s[:4]) @ Vh[:4] @ iroot
    assert torch.allclose(res.U @ res.V, L, atol=1e-8)
    # the reported objective and errors, measured on the data
    Lh = res.U @ res.V
    data = float(((Y - Lh @ X) ** 2).sum()) / n
    assert res.objective == pytest.approx(0.5 * data + 0.5 * lam * float(((p["W"] - Lh) ** 2).sum()), rel=1e-8)
    assert res.relative_error == pytest.approx(data / (float((Y * Y).sum()) / n), rel=1e-8)
    Us, ss, Vs = torch.linalg.svd(p["W"])
    Ls = (Us[:, :4] * ss[:4]) @ Vs[:4]
    svd_err = float(((Y - Ls @ X) ** 2).sum()) / float((Y * Y).sum())
    assert res.svd_relative_error == pytest.approx(svd_err, rel=1e-6)
