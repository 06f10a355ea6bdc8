"""DDLR problem (4): the ADMM solver against cvxpy + SCS, constraints, elbow rule, input checks."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.ddlr import (choose_ddlr_solver, ddlr, ddlr_admm, ddlr_cvxpy, ddlr_epsilon,
                                     ddlr_violation, elbow_rank)
from rankslim.errors import DataError


def _layer(m: int, k: int, n: int, seed: int = 0):
    """A random ReLU layer: W (m, k), post-ReLU-like inputs X (k, n), bias b, pre-bias outputs Y = W X."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, k, generator=g, dtype=torch.float64) / k ** 0.5
    X = torch.relu(torch.randn(k, n, generator=g, dtype=torch.float64))
    b = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    return W, X, b, W @ X


def test_epsilon_is_relative_to_input_norm():
    X = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    assert ddlr_epsilon(X, 0.1) == pytest.approx(0.1 * float(torch.linalg.matrix_norm(X)))
    with pytest.raises(ValueError):
        ddlr_epsilon(X, -1.0)


def test_original_weight_is_feasible():
    W, X, b, Y = _layer(6, 5, 40)
    err, viol = ddlr_violation(W, X, Y, b)
    assert err == pytest.approx(0.0, abs=1e-12) and viol == 0.0
    # a perturbed weight violates the masks: both measures move
    err2, viol2 = ddlr_violation(W + 0.5, X, Y, b)
    assert err2 > 0.1 and viol2 > 0


@pytest.mark.parametrize("eps_rel", [0.05, 0.2])
def test_admm_matches_scs(eps_rel):
    W, X, b, Y = _layer(12, 10, 80, seed=1)
    eps = ddlr_epsilon(X, eps_rel)
    ref = ddlr_cvxpy(X, Y, b, eps, tol=1e-7)
    got = ddlr_admm(X, Y, b, eps, U0=W, tol=1e-6, max_iter=5000)
    assert got.converged
    # objective (nuclear norm) and the solution agree
    assert got.objective == pytest.approx(ref.objective, rel=5e-3)
    assert float(torch.linalg.matrix_norm(got.U - ref.U) / torch.linalg.matrix_norm(ref.U)) < 2e-2
    # both satisfy the constraints of problem (4) within tolerance
    scale = float(Y.abs().max())
    for res in (ref, got):
        assert res.masked_error <= eps * (1 + 5e-3) + 1e-6
        assert res.max_violation <= 5e-3 * scale
    # and the nuclear norm was actually reduced from the original weight's
    assert got.objective < 0.95 * float(torch.linalg.matrix_norm(W, ord="nuc"))


def test_admm_residuals_go_to_zero():
    W, X, b, Y = _layer(10, 8, 60, seed=2)
    res = ddlr_admm(X, Y, b, ddlr_epsilon(X, 0.1), U0=W, tol=1e-7, max_iter=6000, record=True)
    assert res.converged
    r = [h["r"] for h in res.history]
    s = [h["s"] for h in res.history]
    assert r[-1] < 1e-3 * max(r[:5]) and s[-1] < 1e-3 * max(s[:5])


def test_larger_eps_gives_smaller_nuclear_norm_and_rank():
    W, X, b, Y = _layer(16, 12, 80, seed=3)
    objs, ranks = [], []
    for e in (0.02, 0.1, 0.3):
        res = ddlr(X, Y, b, e, W=W, solver="admm")
        objs.append(res.objective)
        ranks.append(int((res.sigma > 1e-6 * res.sigma[0]).sum()))
    assert objs[0] > objs[1] > objs[2]
    assert ranks[0] >= ranks[1] >= ranks[2] and ranks[0] > ranks[2]


def test_auto_solver_switch():
    assert choose_ddlr_solver(20, 15, 100) == "cvxpy"
    assert choose_ddlr_solver(80, 80, 512) == "admm"
    assert choose_ddlr_solver(512, 1024, 256) == "admm"
    assert choose_ddlr_solver(8, 8, 8, "admm") == "admm"
    with pytest.raises(ValueError):
        choose_ddlr_solver(8, 8, 8, "cvxopt")
    W, X, b, Y = _layer(6, 5, 30)
    assert ddlr(X, Y, b, 0.1, W=W).solver == "scs"
    assert ddlr(X, Y, b, 0.1, W=W, solver="admm").solver == "admm"


def test_elbow_rank():
    assert elbow_rank(torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])) == 3
    assert elbow_rank(torch.tensor([10.0, 9.0, 8.5, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5])) == 3
    assert elbow_rank(torch.tensor([4.0])) == 1
    # a geometric spectrum has its elbow early, a slow linear decay has none to speak of
    geo = 0.5 ** torch.arange(20, dtype=torch.float64)
    assert 1 <= elbow_rank(geo) <= 5
    lin = torch.linspace(1.0, 0.9, 10, dtype=torch.float64)
    assert elbow_rank(lin) >= 9


def test_bad_inputs():
    W, X, b, Y = _layer(4, 3, 10)
    with pytest.raises(DataError):
        ddlr_admm(X, Y[:, :5], b, 0.1)
    with pytest.raises(DataError):
        ddlr_admm(X, Y, b[:2], 0.1)
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(DataError):
        ddlr_admm(Xn, Y, b, 0.1)
    with pytest.raises(DataError):
        ddlr_admm(torch.zeros_like(X), Y, b, 0.1)


def test_l1_objective_is_net_trim_and_matches_scs():
    W, X, b, Y = _layer(10, 8, 60, seed=5)
    eps = ddlr_epsilon(X, 0.1)
    ref = ddlr_cvxpy(X, Y, b, eps, tol=1e-7, objective="l1")
    got = ddlr_admm(X, Y, b, eps, U0=W, tol=1e-6, max_iter=6000, objective="l1")
    assert got.objective == pytest.approx(ref.objective, rel=1e-2)
    assert got.objective == pytest.approx(float(got.U.abs().sum()))
    # soft thresholding leaves exact zeros: Net-Trim's sparse weight
    zeros = int((got.U == 0).sum())
    assert zeros >= 5 and zeros >= int((ref.U.abs() < 1e-6 * ref.U.abs().max()).sum()) - 3
    assert got.masked_error <= eps * (1 + 5e-3) + 1e-6
    with pytest.raises(ValueError):
        ddlr_admm(X, Y, b, eps, objective="l0")


def test_linear_activation_constrains_every_entry():
    W, X, b, Y = _layer(8, 6, 50, seed=6)
    eps = ddlr_epsilon(X, 0.1)
    ref = ddlr_cvxpy(X, Y, b, eps, tol=1e-7, activation="linear")
    got = ddlr_admm(X, Y, b, eps, U0=W, tol=1e-6, max_iter=6000, activation="linear")
    assert got.objective == pytest.approx(ref.objective, rel=5e-3)
    full_err = float(torch.linalg.matrix_norm(got.U @ X - Y))
    assert full_err <= eps * (1 + 5e-3) + 1e-6
    # the ReLU relaxation is looser: its optimum has a smaller (or equal) nuclear norm
    relu = ddlr_cvxpy(X, Y, b, eps, tol=1e-7)
    assert relu.objective <= ref.objective + 1e-4
    with pytest.raises(ValueError):
        ddlr_admm(X, Y, b, eps, activation="tanh")
