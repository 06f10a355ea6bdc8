"""GoDec: planted recovery, monotone exact variant, edge cardinalities."""
from __future__ import annotations

import pytest
import torch

from rankslim.decompose.godec import godec
from rankslim.errors import RankError

from ._planted import planted


@pytest.mark.parametrize("exact", [False, True])
def test_recovers_planted_low_rank_plus_sparse(exact):
    p = planted()
    res = godec(p["W"], p["r"], p["c"], exact=exact, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(res.U @ res.V, p["L"], atol=1e-6)
    assert torch.equal(res.mask, p["S"] != 0)
    assert res.objective[-1] < 1e-12 * float((p["W"] ** 2).sum())


def test_exact_variant_is_monotone_on_noisy_data():
    p = planted(c=100)
    W = p["W"] + 0.3 * torch.randn(p["W"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = godec(W, 2, 50, exact=True, iters=40, tol=0)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] < res.objective[0]
    assert int(res.mask.sum()) == 50 and res.U.shape == (30, 2)


def test_edge_cases():
    p = planted()
    full = godec(p["W"], 30, 0)
    assert full.objective[-1] < 1e-18 * float((p["W"] ** 2).sum())
    with pytest.raises(RankError):
        godec(p["W"], 31, 0)
    with pytest.raises(RankError):
        godec(p["W"], 2, -1)
