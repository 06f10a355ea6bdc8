"""EVBMF: rank recovery on synthetic low-rank + Gaussian noise, noise estimation, edge cases."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.evbmf import evbmf


def _low_rank_plus_noise(L: int, M: int, r: int, noise: float, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, r, generator=g, dtype=torch.float64)
    B = torch.randn(r, M, generator=g, dtype=torch.float64)
    return scale * A @ B + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("L,M,r,noise", [
    (50, 80, 5, 0.1), (100, 60, 10, 0.5), (200, 300, 20, 1.0), (30, 30, 3, 0.05), (64, 576, 16, 0.3),
])
def test_recovers_rank_and_noise(L: int, M: int, r: int, noise: float) -> None:
    Y = _low_rank_plus_noise(L, M, r, noise, seed=L + M)
    res = evbmf(Y)
    assert res.rank == r
    assert res.sigma2_estimated
    assert abs(res.sigma2 - noise ** 2) / noise ** 2 < 0.15
    # with the true noise variance the answer is the same
    assert evbmf(Y, sigma2=noise ** 2).rank == r
    assert not evbmf(Y, sigma2=noise ** 2).sigma2_estimated


def test_shrinks_and_thresholds() -> None:
    Y = _low_rank_plus_noise(40, 70, 4, 0.2, seed=1)
    res = evbmf(Y)
    assert res.estimates.shape == (res.rank,)
    # posterior estimates are shrunk, never amplified
    assert bool((res.estimates <= res.singular_values[: res.rank] + 1e-12).all())
    assert bool((res.singular_values[: res.rank] > res.threshold).all())
    assert bool((res.singular_values[res.rank:] <= res.threshold).all())


def test_pure_noise_gives_rank_zero_and_transpose_invariant() -> None:
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(40, 90, generator=g)
    assert evbmf(Y).rank == 0
    Y2 = _low_rank_plus_noise(90, 40, 6, 0.3, seed=4)
    assert evbmf(Y2).rank == evbmf(Y2.T).rank == 6


def test_huge_noise_hides_signal() -> None:
    # a known noise level far above the signal must suppress every component
    Y = _low_rank_plus_noise(30, 50, 3, 0.01, seed=5, scale=0.01)
    assert evbmf(Y, sigma2=100.0).rank == 0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        evbmf(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive"):
        evbmf(torch.eye(3), sigma2=0.0)
    assert evbmf(torch.zeros(4, 5)).rank == 0
