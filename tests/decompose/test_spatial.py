"""Spatial separation (Tai et al.): closed-form optimality and full-rank exactness of SpatialConv2d."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from rankslim.decompose.spatial import (spatial_matrix, spatial_max_rank, spatial_reconstruct, spatial_separation,
                                        spatial_singular_values)
from rankslim.errors import RankError, UnsupportedLayerError
from rankslim.layers import SpatialConv2d
from rankslim.layers.spatial import split_padding

from ._convs import conv_layers


def _separated(conv: nn.Conv2d, rank: int | None = None) -> SpatialConv2d:
    W = conv.weight.detach()
    r = rank or spatial_max_rank(tuple(W.shape))
    f = spatial_separation(W, r)
    return SpatialConv2d.like(conv, r).set_factors(f.vertical, f.horizontal,
                                                  None if conv.bias is None else conv.bias.detach())


def test_matrix_layout_matches_the_theorem() -> None:
    W = torch.randn(4, 3, 2, 5)
    M = spatial_matrix(W)
    N, C, d1, d2 = W.shape
    # (c, i) -> c * kh + i and (n, j) -> n * kw + j (0-based form of the lecture's bijection)
    for n, c, i, j in [(0, 0, 0, 0), (3, 2, 1, 4), (1, 2, 0, 3)]:
        assert M[c * d1 + i, n * d2 + j] == W[n, c, i, j]


def test_truncation_error_is_the_tail_and_full_rank_exact() -> None:
    torch.manual_seed(0)
    W = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    s = spatial_singular_values(W)
    for r in (1, 4, spatial_max_rank(tuple(W.shape))):
        err = torch.linalg.norm(W - spatial_reconstruct(spatial_separation(W, r)))
        assert abs(float(err) - float(s[r:].norm())) < 1e-9
    with pytest.raises(RankError):
        spatial_separation(W, 13)


@settings(max_examples=30, deadline=None)
@given(conv=conv_layers(min_k=1))
def test_full_rank_layer_is_exact(conv: nn.Conv2d) -> None:
    try:
        split_padding(conv)
    except UnsupportedLayerError:
        with pytest.raises(UnsupportedLayerError):
            SpatialConv2d.like(conv, 1)
        return
    x = torch.randn(2, conv.in_channels, 9, 10)
    layer = _separated(conv)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
    assert layer.vertical.stride == (conv.stride[0], 1) and layer.horizontal.stride == (1, conv.stride[1])
    assert layer.vertical.padding_mode == conv.padding_mode


def test_asymmetric_same_padding_is_refused() -> None:
    conv = nn.Conv2d(2, 2, (2, 3), padding="same")
    with pytest.raises(UnsupportedLayerError, match="asymmetric"):
        split_padding(conv)
    assert split_padding(nn.Conv2d(2, 2, 3, padding="same", dilation=2)) == (2, 2)


def test_dense_weight_view() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), bias=True)
    layer = _separated(conv)
    torch.testing.assert_close(layer.weight, conv.weight.detach(), rtol=1e-4, atol=1e-5)
    assert layer.bias is layer.horizontal.bias
