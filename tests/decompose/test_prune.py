"""Magnitude pruning and data-aware IHT (GreBdec model 2)."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.prune import DataTerms, hard_threshold, iht_prune, magnitude_prune
from rankslim.errors import RankError

from ._planted import planted


def test_hard_threshold_keeps_largest():
    M = torch.tensor([[1.0, -5.0, 0.5], [3.0, -0.1, 2.0]])
    S, mask = hard_threshold(M, 3)
    assert mask.sum() == 3 and set(S[mask].tolist()) == {-5.0, 3.0, 2.0}
    assert hard_threshold(M, 0)[1].sum() == 0 and hard_threshold(M, 99)[1].all()
    with pytest.raises(RankError):
        magnitude_prune(M, -1)


def test_magnitude_prune_is_optimal_for_weight_error():
    torch.manual_seed(0)
    W = torch.randn(8, 9)
    S, mask = magnitude_prune(W, 20)
    best = float(((W - S) ** 2).sum())
    for _ in range(20):  # any other support of the same size is worse
        other = torch.zeros(72, dtype=torch.bool)
        other[torch.randperm(72)[:20]] = True
        other = other.reshape(8, 9)
        assert float(((W - W * other) ** 2).sum()) >= best - 1e-6


def test_iht_decreases_objective_and_beats_magnitude():
    p = planted(noise=0.5)
    X = p["X"] * torch.linspace(0.1, 3.0, p["X"].shape[0], dtype=torch.float64)[:, None]  # uneven input scales
    Y = p["W"] @ X
    XX, YX = X @ X.T, Y @ X.T
    res = iht_prune(p["W"], XX, YX, p["n"], 300, yy=float((Y * Y).sum()), t=-4, refit=True)
    obj = res.objective
    assert all(b <= a + 1e-9 * abs(obj[0]) for a, b in zip(obj, obj[1:]))
    assert res.refit <= obj[-1] + 1e-12
    assert int(res.mask.sum()) == 300 and torch.all(res.S[~res.mask] == 0)
    # output error of data-aware pruning is below magnitude pruning's
    S_mag, _ = magnitude_prune(p["W"], 300)
    err = lambda S: float(((Y - S @ X) ** 2).sum())  # noqa: E731
    assert err(res.S) < 0.9 * err(S_mag)


def test_iht_full_cardinality_recovers_weights():
    p = planted()
    res = iht_prune(p["W"], p["XX"], p["YX"], p["n"], p["W"].numel(), yy=p["yy"], t=-6)
    assert torch.allclose(res.S, p["W"], atol=1e-5)


def test_data_terms_objective_matches_definition():
    p = planted(noise=0.2)
    terms = DataTerms.build(p["W"], p["XX"], p["YX"], p["n"], t=-1, yy=p["yy"])
    What = p["W"] + 0.1
    direct = float(((p["Y"] - What @ p["X"]) ** 2).sum()) / (2 * p["n"]) + terms.lam / 2 * float(((p["W"] - What) ** 2).sum())
    assert terms.objective(What) == pytest.approx(direct, rel=1e-9)
