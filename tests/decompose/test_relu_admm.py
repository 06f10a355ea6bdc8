"""ADMM for min ||Y - r((A+B)X + b)||² + λ1||A||_{2,1} + λ2||B||_*: prox steps, convex case vs cvxpy, ReLU case."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.relu_admm import prox_l21_columns, prox_nuclear, relu_admm, relu_admm_objective
from rankslim.errors import DataError


def _problem(m=12, k=10, n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, k, generator=g, dtype=torch.float64)
    X = torch.randn(k, n, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    return W, X, b


@pytest.mark.parametrize("prox,norm", [
    (prox_l21_columns, lambda A: float(torch.linalg.vector_norm(A, dim=0).sum())),
    (prox_nuclear, lambda A: float(torch.linalg.matrix_norm(A, ord="nuc"))),
])
def test_prox_is_the_minimiser(prox, norm):
    g = torch.Generator().manual_seed(1)
    C = torch.randn(7, 5, generator=g, dtype=torch.float64)
    tau = 1.3
    P = prox(C, tau)

    def f(A):
        return tau * norm(A) + 0.5 * float(((A - C) ** 2).sum())

    best = f(P)
    for _ in range(200):  # no random perturbation does better (the prox objective is strongly convex)
        assert f(P + 0.05 * torch.randn(P.shape, generator=g, dtype=torch.float64)) >= best - 1e-12


def test_l21_prox_zeroes_whole_columns():
    C = torch.tensor([[3.0, 0.1, 0.0], [4.0, 0.1, 2.0]], dtype=torch.float64)
    P = prox_l21_columns(C, 1.0)
    assert torch.equal(P[:, 1], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(P[:, 0], C[:, 0] * 4.0 / 5.0)


def test_linear_case_reaches_the_convex_optimum():
    cp = pytest.importorskip("cvxpy")
    W, X, b = _problem()
    Y = W @ X + b[:, None]
    l1, l2 = 20.0, 30.0
    res = relu_admm(X, Y, b, l1, l2, W0=W, activation="linear", max_iter=4000, tol=1e-9)
    assert res.converged
    A, B = cp.Variable(W.shape), cp.Variable(W.shape)
    obj = (cp.sum_squares(Y.numpy() - (A + B) @ X.numpy() - b.numpy()[:, None])
           + l1 * cp.sum(cp.norm(A, 2, axis=0)) + l2 * cp.normNuc(B))
    prob = cp.Problem(cp.Minimize(obj))
    prob.solve(solver=cp.SCS, eps_abs=1e-9, eps_rel=1e-9, max_iters=100000)
    assert res.objective == pytest.approx(prob.value, rel=1e-5)
    assert torch.allclose(res.A + res.B, res.M, atol=1e-6)


def test_relu_case_converges_and_improves():
    W, X, b = _problem(seed=2)
    Y = torch.relu(W @ X + b[:, None])
    l1, l2 = 20.0, 30.0
    res = relu_admm(X, Y, b, l1, l2, W0=W, max_iter=3000, record=True)
    assert res.converged
    r = [h["r"] for h in res.history]
    assert r[-1] < 1e-4 * max(r)  # primal residual A + B - M -> 0
    start = relu_admm_objective(torch.zeros_like(W), W, X, Y, b, l1, l2)
    assert res.objective < 0.9 * start
    assert res.rank < min(W.shape)
    # the reported data error is the ReLU response error of A + B
    assert res.data_error == pytest.approx(float(torch.linalg.vector_norm(
        Y - torch.relu((res.A + res.B) @ X + b[:, None]))))


def test_penalties_switch_parts_off():
    W, X, b = _problem(seed=3)
    Y = torch.relu(W @ X + b[:, None])
    huge = 1e9
    only_b = relu_admm(X, Y, b, huge, 5.0, W0=W, max_iter=500)
    assert only_b.columns.numel() == 0 and only_b.rank > 0
    only_a = relu_admm(X, Y, b, 5.0, huge, W0=W, max_iter=500)
    assert only_a.rank == 0 and only_a.columns.numel() > 0


def test_no_penalty_linear_recovers_the_weight():
    W, X, b = _problem(m=6, k=4, n=50, seed=4)
    res = relu_admm(X, W @ X + b[:, None], b, 0.0, 0.0, activation="linear", max_iter=3000, tol=1e-10)
    assert torch.allclose(res.A + res.B, W, atol=1e-5)


def test_bad_inputs():
    W, X, b = _problem()
    with pytest.raises(DataError):
        relu_admm(X, (W @ X)[:, :5], b, 1.0, 1.0)
    with pytest.raises(ValueError):
        relu_admm(X, W @ X, b, -1.0, 1.0)
    with pytest.raises(ValueError):
        relu_admm(X, W @ X, b, 1.0, 1.0, activation="tanh")
