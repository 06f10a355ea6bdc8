"""Tucker-2 / Tucker-1: HOSVD/HOOI factors, EVBMF ranks, and full-rank exactness of TuckerConv2d."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from rankslim.decompose.tucker import evbmf_tucker_ranks, tucker2, tucker_reconstruct
from rankslim.errors import RankError
from rankslim.layers import TuckerConv2d

from ._convs import conv_layers


def _multilinear(N: int, C: int, r3: int, r4: int, k: int, seed: int) -> torch.Tensor:
    """A kernel ``(N, C, k, k)`` of exact multilinear rank ``(r3, r4)`` in the channel modes."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r4, r3, k, k, generator=g, dtype=torch.float64)
    U4 = torch.linalg.qr(torch.randn(N, r4, generator=g, dtype=torch.float64))[0]
    U3 = torch.linalg.qr(torch.randn(C, r3, generator=g, dtype=torch.float64))[0]
    return torch.einsum("rsij,nr,cs->ncij", core, U4, U3)


def test_full_and_exact_multilinear_rank_reconstruct() -> None:
    K = _multilinear(12, 10, 4, 5, 3, seed=0)
    assert tucker2(K, (4, 5)).rel_error < 1e-10
    assert tucker2(K, (None, 5)).rel_error < 1e-10
    assert tucker2(K, (3, 5)).rel_error > 1e-3  # one rank short: cannot be exact
    W = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    f = tucker2(W, (5, 7))
    assert torch.allclose(tucker_reconstruct(f), W, atol=1e-10)
    with pytest.raises(RankError):
        tucker2(W, (6, 7))
    with pytest.raises(RankError):
        tucker2(W, (5, 0))


def test_hooi_never_worse_than_hosvd() -> None:
    torch.manual_seed(1)
    W = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    hosvd = tucker2(W, (5, 6))
    hooi = tucker2(W, (5, 6), n_iter=10)
    assert hooi.n_iter >= 1
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    # factors stay orthonormal
    assert torch.allclose(hooi.U_in.T @ hooi.U_in, torch.eye(5, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("N,C,r3,r4,noise", [(64, 48, 8, 12, 0.01), (96, 64, 16, 10, 0.02)])
def test_evbmf_ranks_recover_multilinear_rank(N: int, C: int, r3: int, r4: int, noise: float) -> None:
    K = _multilinear(N, C, r3, r4, 3, seed=N)
    g = torch.Generator().manual_seed(2)
    K = K + noise * torch.randn(K.shape, generator=g, dtype=torch.float64)
    assert evbmf_tucker_ranks(K) == (r3, r4)
    assert evbmf_tucker_ranks(K, tucker1=True) == (None, r4)


@settings(max_examples=30, deadline=None)
@given(conv=conv_layers(min_k=1))
def test_full_rank_layer_is_exact(conv: nn.Conv2d) -> None:
    W = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()
    x = torch.randn(2, conv.in_channels, 9, 10)
    for ranks in ((conv.in_channels, conv.out_channels), (None, conv.out_channels)):
        f = tucker2(W, ranks)
        layer = TuckerConv2d.like(conv, ranks).set_factors(f.core, f.U_in, f.U_out, bias)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
        assert layer.core.stride == conv.stride and layer.core.padding == conv.padding
        assert (layer.first is None) == (ranks[0] is None)


def test_dense_weight_view() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3)
    W = conv.weight.detach()
    for ranks in ((5, 6), (None, 6)):
        f = tucker2(W, ranks)
        layer = TuckerConv2d.like(conv, ranks).set_factors(f.core, f.U_in, f.U_out, conv.bias.detach())
        torch.testing.assert_close(layer.weight, W, rtol=1e-4, atol=1e-5)
