"""Gavish-Donoho threshold and the EVBMF allocator's rank rule."""
from __future__ import annotations

import pytest
import torch

from rankslim.allocate.signal import gavish_donoho_omega, gavish_donoho_rank


def test_omega_matches_paper_values():
    # Gavish & Donoho: omega(1) ~= 2.858 (the value quoted by COBLA section 4), lambda*(beta) < omega(beta)
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=0.01)
    assert gavish_donoho_omega(0.5) < gavish_donoho_omega(1.0)
    with pytest.raises(ValueError):
        gavish_donoho_omega(1.5)


@pytest.mark.parametrize("shape,rank", [((60, 80), 5), ((100, 50), 3)])
def test_recovers_rank_of_low_rank_plus_noise(shape, rank):
    g = torch.Generator().manual_seed(0)
    a, b = shape
    X = torch.randn(a, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, b, generator=g, dtype=torch.float64)
    Y = X * 3.0 + torch.randn(a, b, generator=g, dtype=torch.float64)
    assert gavish_donoho_rank(torch.linalg.svdvals(Y), shape) == rank
    # pure noise: nothing above the threshold
    assert gavish_donoho_rank(torch.linalg.svdvals(torch.randn(a, b, generator=g, dtype=torch.float64)), shape) <= 1
