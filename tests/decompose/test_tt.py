"""Tensor-Train matrices: size factorization, TT-SVD exactness, and TTLinear == dense product at full ranks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankslim.cost import flop_counter_macs, model_cost
from rankslim.decompose.tt import factorize_size, tt_full_ranks, tt_svd_matrix, tt_to_matrix
from rankslim.errors import RankError
from rankslim.layers import TTLinear


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5000), d=st.integers(1, 4))
def test_factorize_size(n: int, d: int) -> None:
    f = factorize_size(n, d)
    assert len(f) == d and math.prod(f) == n and f == sorted(f, reverse=True)


def test_balanced_splits() -> None:
    assert factorize_size(4096, 3) == [16, 16, 16]
    assert factorize_size(784, 3) == [14, 8, 7]
    assert factorize_size(13, 3) == [13, 1, 1]


@settings(max_examples=15, deadline=None)
@given(fin=st.integers(1, 40), fout=st.integers(1, 40), d=st.integers(2, 3), bias=st.booleans())
def test_full_rank_tt_linear_equals_dense(fin: int, fout: int, d: int, bias: bool) -> None:
    torch.manual_seed(fin * 41 + fout)
    lin = torch.nn.Linear(fin, fout, bias=bias)
    outf, inf = factorize_size(fout, d), factorize_size(fin, d)
    full = tt_full_ranks(outf, inf)
    tt = tt_svd_matrix(lin.weight.detach(), outf, inf, full)
    assert tt.ranks == full
    layer = TTLinear.like(lin, inf, outf, full).set_cores(tt.cores, None if lin.bias is None else lin.bias.detach())
    x = torch.randn(3, 2, fin)  # leading dims are kept, like nn.Linear
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight_matrix(), lin.weight.detach(), rtol=1e-4, atol=1e-5)


def test_truncation_and_rank_checks() -> None:
    torch.manual_seed(0)
    W = torch.randn(24, 30, dtype=torch.float64)
    outf, inf = [4, 3, 2], [5, 3, 2]
    errs = [tt_svd_matrix(W, outf, inf, r).rel_error for r in (1, 3, 6, 12)]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    assert tt_svd_matrix(W, outf, inf, 1000).rel_error < 1e-12  # an int is clipped to the full ranks
    with pytest.raises(RankError):
        tt_svd_matrix(W, outf, inf, [1, 500, 2, 1])
    with pytest.raises(ValueError, match="multiply"):
        tt_svd_matrix(W, [5, 5, 1], inf, 2)


def test_forward_never_needs_the_dense_weight_and_cost_matches_flop_counter() -> None:
    torch.manual_seed(0)
    outf, inf, ranks = [4, 4, 4], [8, 8, 8], [1, 5, 7, 1]
    layer = TTLinear(512, 64, inf, outf, ranks)
    x = torch.randn(2, 512)
    torch.testing.assert_close(layer(x), x @ tt_to_matrix(list(layer.cores)).T, rtol=1e-4, atol=1e-5)
    mc = model_cost(layer, (512,)).total
    assert mc.macs == flop_counter_macs(layer, (512,))
    assert mc.params == sum(p.numel() for p in layer.parameters())
    # tokens: MACs scale with positions
    assert model_cost(layer, (3, 512)).total.macs == 3 * mc.macs == flop_counter_macs(layer, (3, 512))
