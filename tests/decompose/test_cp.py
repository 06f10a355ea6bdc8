"""CP-ALS: recovery of a known CP rank, agreement with TensorLy, memory guard, and CPConv2d exactness."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from rankslim.decompose.cp import cp_als, cp_als_bytes, cp_to_tensor
from rankslim.errors import RankError, UnsupportedLayerError
from rankslim.layers import CPConv2d
from rankslim.layers.spatial import split_padding

from ._convs import conv_layers


def _cp_tensor(shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    return cp_to_tensor(torch.ones(rank, dtype=torch.float64), fs), fs


@pytest.mark.parametrize("shape,rank", [((8, 6, 3, 3), 5), ((10, 7, 5), 4)])
def test_recovers_known_cp_rank(shape: tuple[int, ...], rank: int) -> None:
    T, _ = _cp_tensor(shape, rank, seed=sum(shape))
    res = cp_als(T, rank, n_iter_max=1000, tol=1e-13, generator=torch.Generator().manual_seed(0))
    approx = cp_to_tensor(res.weights, res.factors)
    assert float(torch.linalg.norm(T - approx) / torch.linalg.norm(T)) < 1e-5
    assert abs(res.rel_error - float(torch.linalg.norm(T - approx) / torch.linalg.norm(T))) < 1e-6
    # one component short of the true rank cannot be exact
    assert cp_als(T, rank - 1, n_iter_max=200).rel_error > 1e-3


def test_error_is_non_increasing_and_matches_tensorly() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    torch.manual_seed(0)
    W = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    res = cp_als(W, 20, n_iter_max=30, tol=0.0)
    assert res.n_iter == 30
    assert all(b <= a + 1e-9 for a, b in zip(res.errors, res.errors[1:]))  # ALS is monotone
    tl.set_backend("numpy")
    cp = parafac(W.numpy(), 20, n_iter_max=30, init="random", tol=0.0, random_state=0)
    ref = float(torch.linalg.norm(W - torch.from_numpy(tl.cp_to_tensor(cp))) / torch.linalg.norm(W))
    # same algorithm family, different init: comparable fit (not byte-identical)
    assert res.rel_error < ref * 1.15


def test_memory_guard_refuses_before_allocating() -> None:
    # a VGG-sized kernel at a large rank: the estimate is in the GiB range, and it is refused
    assert cp_als_bytes((512, 512, 3, 3), 4000) > 2 ** 30
    need = cp_als_bytes((64, 64, 3, 3), 50)
    with pytest.raises(RankError, match="GiB"):
        cp_als(torch.zeros(64, 64, 3, 3), 50, max_bytes=need - 1)
    assert cp_als(torch.randn(64, 64, 3, 3), 50, n_iter_max=2, max_bytes=need).n_iter <= 2


@settings(max_examples=30, deadline=None)
@given(conv=conv_layers(min_k=1))
def test_layer_is_exact_for_a_cp_kernel(conv: nn.Conv2d) -> None:
    """With the kernel replaced by an exact rank-R CP tensor, the CP layer equals the conv."""
    try:
        split_padding(conv)
    except UnsupportedLayerError:
        return
    N, C, kh, kw = conv.weight.shape
    R = 3
    g = torch.Generator().manual_seed(N * 100 + C)
    fs = [torch.randn(n, R, generator=g) for n in (N, C, kh, kw)]
    w = torch.rand(R, generator=g) + 0.5
    with torch.no_grad():
        conv.weight.copy_(cp_to_tensor(w, fs))
    layer = CPConv2d.like(conv, R).set_factors(w, *fs, None if conv.bias is None else conv.bias.detach())
    x = torch.randn(2, C, 9, 10)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    assert layer.vertical.groups == R and layer.horizontal.groups == R


def test_dense_weight_view() -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 5, (3, 2))
    fs = [torch.randn(n, 3, generator=g) for n in (5, 4, 3, 2)]
    w = torch.rand(3, generator=g)
    layer = CPConv2d.like(conv, 3).set_factors(w, *fs, None)
    torch.testing.assert_close(layer.weight, cp_to_tensor(w, fs), rtol=1e-4, atol=1e-5)


def test_cp_to_tensor_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in [(4, 3), (5, 4, 3), (6, 5, 3, 2)]:
        fs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in shape]
        w = torch.rand(4, generator=g, dtype=torch.float64)
        ref = sum(w[r] * torch.einsum(",".join("abcd"[: len(shape)]) + "->" + "abcd"[: len(shape)],
                                      *[f[:, r] for f in fs]) for r in range(4))
        torch.testing.assert_close(cp_to_tensor(w, fs), ref)
