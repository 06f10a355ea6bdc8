"""LRPET projection: energy transfer keeps ||W||_F at the target rank; BN rectification on a hand-computed case."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rankslim.errors import RankError
from rankslim.train.lrpet import Projector, ProjectionTarget, bn_scale, conv_bn_pairs, lrpet_rank, project_weight


def test_energy_transfer_keeps_frobenius_norm_and_has_target_rank():
    torch.manual_seed(0)
    W = torch.randn(20, 30, dtype=torch.float64)
    s = np.linalg.svd(W.numpy(), compute_uv=False)  # independent reference: numpy's LAPACK SVD
    P = project_weight(W, 5, energy_transfer=True)
    assert np.linalg.matrix_rank(P.numpy(), tol=1e-8 * s[0]) == 5
    assert float(torch.linalg.norm(P)) == pytest.approx(float(np.sqrt((s ** 2).sum())), rel=1e-12)
    # without energy transfer: the Eckart-Young truncation, norm sqrt(sum of the top-5 squared singular values)
    Q = project_weight(W, 5, energy_transfer=False)
    assert np.linalg.matrix_rank(Q.numpy(), tol=1e-8 * s[0]) == 5
    assert float(torch.linalg.norm(Q)) == pytest.approx(float(np.sqrt((s[:5] ** 2).sum())), rel=1e-12)
    # energy transfer is alpha * P_r(W) (eq. 6): same direction
    alpha = np.sqrt((s ** 2).sum()) / np.sqrt((s[:5] ** 2).sum())
    assert torch.allclose(P, alpha * Q, atol=1e-12)


def test_conv_weight_projection_in_im2col_view_float32():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 6, 3)
    W = conv.weight.detach().reshape(6, -1)
    r = lrpet_rank((6, 72), 0.5)
    assert r == 3
    Projector([ProjectionTarget("c", conv, r)]).project()
    M = conv.weight.detach().reshape(6, -1).double().numpy()
    sv = np.linalg.svd(M, compute_uv=False)
    assert (sv[r:] < 1e-5 * sv[0]).all() and sv[r - 1] > 1e-3 * sv[0]
    assert np.linalg.norm(M) == pytest.approx(float(torch.linalg.norm(W.double())), rel=1e-5)


def test_bn_rectification_hand_computed():
    # conv 1x1 with W = diag(1.5, 2) followed by BN with gamma = (2, 1), running_var = (1, 4), bn eps = 0:
    # d = gamma / sigma = (2, 0.5), W~ = d W = diag(3, 1).  Rank 1: keep s1 = 3, alpha = sqrt(9 + 1) / 3, so
    # W~' = diag(sqrt(10), 0); eq. 10: W^ = d / (d^2 + eps) W~' = diag(2 sqrt(10) / (4 + eps), 0).
    eps = 1e-5
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2, eps=0.0))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.5, 0.0], [0.0, 2.0]]).reshape(2, 2, 1, 1))
        model[1].weight.copy_(torch.tensor([2.0, 1.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 4.0]))
    assert conv_bn_pairs(model, torch.zeros(1, 2, 3, 3)) == {"0": "1"}
    assert torch.allclose(bn_scale(model[1]), torch.tensor([2.0, 0.5], dtype=torch.float64))
    Projector([ProjectionTarget("0", model[0], 1, model[1])], eps=eps).project()
    expected = torch.tensor([[2 * math.sqrt(10) / (4 + eps), 0.0], [0.0, 0.0]])
    assert torch.allclose(model[0].weight.detach().reshape(2, 2), expected, atol=1e-6)
    # ablation: without BN rectification the largest singular value of W itself (2, row 2) is kept and
    # scaled by alpha = sqrt(1.5^2 + 2^2) / 2 = 1.25 -> diag(0, 2.5)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.5, 0.0], [0.0, 2.0]]).reshape(2, 2, 1, 1))
    Projector([ProjectionTarget("0", model[0], 1, None)], eps=eps).project()
    assert torch.allclose(model[0].weight.detach().reshape(2, 2), torch.tensor([[0.0, 0.0], [0.0, 2.5]]), atol=1e-6)


def test_rank_rule_and_bad_ratio():
    assert lrpet_rank((64, 576), 0.6) == 25  # floor(0.4 * 64)
    assert lrpet_rank((10, 3), 0.99) == 1
    with pytest.raises(RankError):
        lrpet_rank((4, 4), 1.0)


def test_projection_matches_algorithm1_matrix_formulas_with_negative_and_tiny_gamma():
    # Algorithm 1 lines 5-10 written with the paper's matrices (numpy, float64), independent of project_weight's
    # row-wise shortcut: W~ = Gamma Sigma^-1 W, top-r SVD with alpha = ||s|| / ||s_1:r||, then eq. 10
    # W^ = [(Gamma Sigma^-1)^T Gamma Sigma^-1 + eps I]^-1 (Gamma Sigma^-1)^T W~'.
    rng = np.random.default_rng(3)
    m, n, r, eps = 6, 10, 2, 1e-5
    W = rng.standard_normal((m, n))
    gamma = np.array([1.3, -0.7, 2e-3, 0.9, -1.1, 0.4])   # a negative and a nearly-dead channel
    var = np.array([0.5, 2.0, 1.0, 3.0, 0.25, 1.5])
    D = np.diag(gamma / np.sqrt(var))
    U, s, Vt = np.linalg.svd(D @ W, full_matrices=False)
    s_new = np.zeros_like(s)
    s_new[:r] = s[:r] * np.linalg.norm(s) / np.linalg.norm(s[:r])
    Wt_prime = U @ np.diag(s_new) @ Vt
    expected = np.linalg.solve(D.T @ D + eps * np.eye(m), D.T @ Wt_prime)
    got = project_weight(torch.tensor(W), r, scale=torch.tensor(gamma / np.sqrt(var)), eps=eps).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert np.linalg.matrix_rank(got, tol=1e-9) == r
    # the rectified, energy-transferred weight keeps the Frobenius norm of Gamma Sigma^-1 W (eq. 6 on W~)
    assert np.linalg.norm(Wt_prime) == pytest.approx(np.linalg.norm(D @ W), rel=1e-12)
