"""GreBdec Algorithm 1 and the eq. (3) alternating GSVD solver."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.godec import godec
from rankslim.decompose.grebdec import grebdec, gsvd_lowrank_sparse
from rankslim.errors import RankError

from ._planted import planted


def _monotone(obj, scale):
    return all(b <= a + 1e-10 * scale for a, b in zip(obj, obj[1:]))


def test_recovers_planted_low_rank_plus_sparse():
    p = planted()
    res = grebdec(p["W"], p["XX"], p["YX"], p["n"], p["r"], p["c"], yy=p["yy"], t=-6, eta=1.0, max_iter=300,
                  tol=1e-14, delta_r=1)
    assert res.ranks[:4] == [1, 2, 3, 3]                   # greedy growth by Δr = 1 up to r
    assert torch.allclose(res.U @ res.V + res.S, p["W"], atol=1e-5)
    assert torch.equal(res.mask, p["S"] != 0)


def test_objective_decreases_on_noisy_data():
    p = planted(noise=1.0, c=150)
    for t in (-3.0, 0.0):
        res = grebdec(p["W"], p["XX"], p["YX"], p["n"], 5, 100, yy=p["yy"], t=t, max_iter=40, tol=0)
        assert _monotone(res.objective, abs(res.objective[0]))
        assert res.objective[-1] < res.objective[0]
        assert res.U.shape == (30, 5) and int(res.mask.sum()) == 100
        assert res.eta_used <= 1e-3


def test_data_term_beats_godec_on_the_outputs():
    """With uneven input scales the data-aware fit reconstructs Y better than the weight-only fit."""
    p = planted(noise=0.0, c=150)
    X = p["X"] * torch.linspace(0.02, 3.0, p["X"].shape[0], dtype=torch.float64)[:, None]
    W = p["W"] + 0.5 * torch.randn(p["W"].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Y = W @ X
    res = grebdec(W, X @ X.T, Y @ X.T, p["n"], 3, 100, yy=float((Y * Y).sum()), t=-4, eta=1.0, max_iter=100)
    gd = godec(W, 3, 100)
    err = lambda Wh: float(((Y - Wh @ X) ** 2).sum())  # noqa: E731
    assert err(res.U @ res.V + res.S) < 0.95 * err(gd.U @ gd.V + gd.S)


def test_gsvd_alternating_solver_decreases_and_agrees():
    p = planted(noise=0.5)
    a = gsvd_lowrank_sparse(p["W"], p["XX"], p["YX"], p["n"], 3, 60, yy=p["yy"], t=-4, eta=1.0, max_iter=50, tol=0)
    assert _monotone(a.objective, abs(a.objective[0]))
    b = grebdec(p["W"], p["XX"], p["YX"], p["n"], 3, 60, yy=p["yy"], t=-4, eta=1.0, max_iter=200, tol=1e-12)
    assert b.objective[-1] == pytest.approx(a.objective[-1], rel=1e-3, abs=1e-6)


def test_bad_ranks():
    p = planted()
    with pytest.raises(RankError):
        grebdec(p["W"], p["XX"], p["YX"], p["n"], 0, 10)
    with pytest.raises(RankError):
        grebdec(p["W"], p["XX"], p["YX"], p["n"], 31, 10)
