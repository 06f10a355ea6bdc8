"""Full-rank exactness of the low-rank layers over every conv hyper-parameter they claim to support."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankslim.decompose.svd import truncated_svd
from rankslim.layers import LowRankConv2d, LowRankLinear


def _full_rank_conv(conv: nn.Conv2d) -> LowRankConv2d:
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    f = truncated_svd(w, min(w.shape), solver="exact")
    return LowRankConv2d.like(conv, f.rank).set_factors(f.U, f.V, None if conv.bias is None else conv.bias.detach())


@settings(max_examples=25, deadline=None)
@given(
    cin=st.integers(1, 6), cout=st.integers(1, 6),
    kh=st.integers(1, 3), kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same")),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
)
def test_lowrank_conv_full_rank_is_exact(cin, cout, kh, kw, stride, padding, dilation, bias, padding_mode):
    if padding == "same":
        stride = (1, 1)  # PyTorch refuses padding='same' with strides
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=padding_mode)
    x = torch.randn(2, cin, 9, 10)
    layer = _full_rank_conv(conv)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
    assert layer.first.stride == conv.stride and layer.first.dilation == conv.dilation
    assert layer.first.padding_mode == conv.padding_mode


@settings(max_examples=15, deadline=None)
@given(fin=st.integers(1, 12), fout=st.integers(1, 12), bias=st.booleans())
def test_lowrank_linear_full_rank_is_exact(fin, fout, bias):
    torch.manual_seed(1)
    lin = nn.Linear(fin, fout, bias=bias)
    f = truncated_svd(lin.weight.detach(), min(fin, fout))
    layer = LowRankLinear.like(lin, f.rank).set_factors(f.U, f.V, None if lin.bias is None else lin.bias.detach())
    x = torch.randn(3, 5, fin)  # extra leading dims: tokens
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-5)


def test_truncation_error_is_the_spectrum_tail():
    torch.manual_seed(0)
    w = torch.randn(40, 30, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 29):
        f = truncated_svd(w, r)
        err = torch.linalg.norm(w - f.U @ f.V)
        assert abs(err - s[r:].norm()) < 1e-8


def test_randomized_matches_exact_on_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 400, generator=g, dtype=torch.float64)
    f = truncated_svd(w, 20, solver="randomized", generator=g)
    assert f.solver == "randomized"
    assert torch.linalg.norm(w - f.U @ f.V) / torch.linalg.norm(w) < 1e-10


def test_gram_solver_matches_exact():
    g = torch.Generator().manual_seed(3)
    for shape in ((50, 200), (200, 50)):
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        ex = truncated_svd(w, 30, solver="exact")
        gr = truncated_svd(w, 30, solver="gram")
        torch.testing.assert_close(gr.U @ gr.V, ex.U @ ex.V, rtol=1e-9, atol=1e-9)


def test_large_matrix_spectrum_via_gram_matches_svdvals(monkeypatch):
    import rankslim.decompose.svd as svd
    w = torch.randn(300, 120, dtype=torch.float64)
    exact = svd.singular_values(w)
    monkeypatch.setattr(svd, "LARGE_MIN_ENTRIES", 100)
    torch.testing.assert_close(svd.singular_values(w), exact, rtol=1e-9, atol=1e-9)
    assert svd.choose_solver((300, 120), 5) == "randomized"
    assert svd.choose_solver((300, 120), 60) == "gram"
