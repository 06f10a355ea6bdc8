"""Sparse and low-rank + sparse layers: exactness, masked gradients, honest COO cost, reload."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from torch import nn

from rankslim.cost import model_cost
from rankslim.layers.sparse import (LowRankSparseConv2d, LowRankSparseLinear, SparseConv2d, SparseLinear,
                                    build_lowrank_sparse)

from ..decompose._convs import conv_layers


@settings(max_examples=20, deadline=None)
@given(conv=conv_layers(max_c=4))
def test_sparse_conv_full_mask_is_exact(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 9, 8)
    layer = SparseConv2d.like(conv).set_sparse(conv.weight.detach(), torch.ones_like(conv.weight, dtype=torch.bool),
                                                conv.bias.detach() if conv.bias is not None else None)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(conv=conv_layers(max_c=4))
def test_lowrank_sparse_conv_reproduces_split_weight(conv):
    """U V (full rank, from the SVD of W − S) plus S on a random support equals the original conv."""
    torch.manual_seed(1)
    W = conv.weight.detach().reshape(conv.out_channels, -1).double()
    mask = torch.rand(W.shape) < 0.3
    S = W * mask * 0.7
    U, s, Vh = torch.linalg.svd(W - S, full_matrices=False)
    r = s.numel()
    layer = LowRankSparseConv2d.like(conv, r).set_factors(U * s, Vh, S, mask,
                                                          conv.bias.detach() if conv.bias is not None else None)
    x = torch.randn(2, conv.in_channels, 9, 8)
    assert torch.allclose(layer(x), conv(x), atol=1e-4)
    assert torch.allclose(layer.weight, conv.weight, atol=1e-5)


def test_lowrank_sparse_linear_exact_and_tokens():
    torch.manual_seed(2)
    lin = nn.Linear(7, 5)
    W = lin.weight.detach().double()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[0, :3] = True
    S = W * mask
    U, s, Vh = torch.linalg.svd(W - S, full_matrices=False)
    layer = LowRankSparseLinear.like(lin, 5).set_factors(U * s, Vh, S, mask, lin.bias.detach())
    x = torch.randn(3, 4, 7)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)
    sp = SparseLinear.like(lin).set_sparse(W, torch.ones_like(mask), lin.bias.detach())
    assert torch.allclose(sp(x), lin(x), atol=1e-6)


def test_masked_gradients_stay_zero_and_mask_holds():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    W = conv.weight.detach().clone()
    mask = W.abs() > W.abs().median()
    layer = SparseConv2d.like(conv).set_sparse(W, mask, conv.bias.detach())
    assert int((layer.weight != 0).sum()) <= int(mask.sum())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        loss = layer(torch.randn(2, 3, 6, 6)).square().sum()
        opt.zero_grad()
        loss.backward()
        assert torch.all(layer.weight.grad[~mask] == 0)
        opt.step()
    assert torch.all(layer.weight[~mask] == 0)
    assert layer.nnz == int(mask.sum())


def test_cost_counts_coo_storage():
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    W = conv.weight.detach()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.view(-1)[:20] = True
    sp = SparseConv2d.like(conv).set_sparse(W, mask, conv.bias.detach())
    c = sp.rankslim_cost((4, 8, 8), (6, 4, 4))
    assert c.params == 2 * 20 + 6 and c.macs == 20 * 16
    ls = LowRankSparseConv2d.like(conv, 2).set_factors(torch.randn(6, 2), torch.randn(2, 36), W, mask, conv.bias.detach())
    c2 = ls.rankslim_cost((4, 8, 8), (6, 4, 4))
    assert c2.params == 2 * (6 + 36) + 6 + 2 * 20 and c2.macs == 16 * (2 * (6 + 36) + 20)
    model = nn.Sequential(ls, nn.ReLU())
    mc = model_cost(model, (4, 8, 8))
    assert mc.total.params == c2.params and mc.total.macs == c2.macs


def test_structure_reloads_from_state_dict():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    W = conv.weight.detach()
    mask = torch.rand(W.shape) < 0.2
    a = build_lowrank_sparse(conv, 2).set_factors(torch.randn(5, 2), torch.randn(2, 27), W, mask, conv.bias.detach())
    b = build_lowrank_sparse(conv, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(a(x), b(x)) and b.sparse.nnz == int(mask.sum())
    assert isinstance(build_lowrank_sparse(conv, 0), SparseConv2d)
