"""COBLA: the SQP core, randomized rounding, linear costs, the masked network and the scales."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import TensorDataset

import rankslim
from rankslim.allocate import Allocation, Budget, CostTable, LayerOption
from rankslim.methods import get_method
from rankslim.allocate.cobla import mask_groups, randomized_round, sqp_relaxation
from rankslim.allocate.linear import linear_costs
from rankslim.allocate.masked import SpectralNet, layer_spectrum, scaled_weight
from rankslim.cost import Cost, trace_shapes
from rankslim.errors import BudgetError
from rankslim.surgery import select_targets

from .._measure import count_macs, count_params
from ._tables import random_table


def _separable_optimum(w, c, B):
    """argmin sum w (1 - x)^2 s.t. c.x <= B, 0 <= x <= 1: x = clip(1 - lam c / (2 w)), lam by bisection."""
    def x_of(lam):
        return np.clip(1.0 - lam * c / (2.0 * w), 0.0, 1.0)
    if c @ x_of(0.0) <= B:
        return x_of(0.0)
    lo, hi = 0.0, 1.0
    while c @ x_of(hi) > B:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if c @ x_of(mid) > B else (lo, mid)
    return x_of(hi)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sqp_reaches_known_optimum_of_separable_convex_loss(seed):
    rng = np.random.default_rng(seed)
    n = 40
    w = rng.uniform(0.1, 2.0, n)
    c = rng.uniform(0.5, 3.0, n)
    B = 0.4 * c.sum()
    x_star = _separable_optimum(w, c, B)

    def fun(x):
        d = 1.0 - x
        return float(np.sum(w * d * d)), -2.0 * w * d

    res = sqp_relaxation(fun, c[None, :], np.array([B]), np.full(n, 0.5), maxiter=200)
    assert c @ res.x <= B + 1e-6
    f_star = fun(x_star)[0]
    assert res.fun == pytest.approx(f_star, rel=1e-5, abs=1e-8)
    np.testing.assert_allclose(res.x, x_star, atol=1e-3)


def test_sqp_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sqp_relaxation(lambda x: (0.0, x), np.ones((1, 3)), np.ones(1), np.zeros(4))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), eta=st.floats(0.2, 0.95), round_to=st.sampled_from([1, 2, 4]),
       tries=st.sampled_from([1, 5, 200]))
def test_randomized_rounding_always_ends_feasible(seed, eta, round_to, tries):
    table = random_table(seed % 50, layers=5, round_to=round_to)
    budget = Budget(params=eta, macs=eta)
    try:
        table.require_feasible(budget)
    except BudgetError:
        return
    rng = np.random.default_rng(seed)
    s = np.array([rng.uniform(0.5, lo.max_rank) for lo in table.layers])  # any relaxed ranks
    ranks, n_tries, how = randomized_round(s, table, budget, torch.Generator().manual_seed(seed), tries)
    assert table.fits(ranks, budget)
    assert how in ("random", "floor", "projected") and 1 <= n_tries <= tries


def test_randomized_rounding_is_unbiased_draw():
    table = random_table(3, layers=3)
    s = np.array([2.3, 4.5, 1.9])
    big = Budget(params=1.0, macs=1.0)
    gen = torch.Generator().manual_seed(0)
    draws = [randomized_round(s, table, big, gen, 1)[0] for _ in range(400)]
    r0 = np.array([d[table.layers[0].name] or table.layers[0].max_rank for d in draws])
    assert set(r0) <= {2, 3} and abs(r0.mean() - 2.3) < 0.08  # E[round(x)] = x (eq. 9)


def test_mask_groups():
    idx, n = mask_groups([4, 6], None)
    assert n == 10 and idx[1].tolist() == list(range(4, 10))
    idx, n = mask_groups([100, 300], 40)
    assert n == 40 and idx[0].max() < idx[1].min() and len(idx[1]) == 300
    assert torch.all(idx[1][1:] >= idx[1][:-1])  # consecutive singular values share a variable


def test_linear_costs_refuse_non_affine_with_reason():
    sig = torch.linspace(3, 1, 8, dtype=torch.float64)
    ok = LayerOption("a", 8, Cost(64, 640), lambda r: Cost(16 * r + 8, 160 * r), sig)
    quad = LayerOption("b", 8, Cost(64, 640), lambda r: Cost(r * r, 10 * r * r), sig, method="tucker")
    lin = linear_costs(CostTable([ok], Cost(100, 1000)), "cobla")
    assert lin.slope["params"][0] == 16 and lin.intercept["params"][0] == 8 and lin.slope["macs"][0] == 160
    with pytest.raises(BudgetError, match="'b' with method 'tucker'"):
        linear_costs(CostTable([ok, quad], Cost(200, 2000)), "cobla")


def _targets(model, shape=(1, 8, 8)):
    targets, _ = select_targets(model, trace_shapes(model, shape))
    return targets


@pytest.mark.parametrize("method", ["svd", "spatial"])
def test_masked_network_equals_compressed_model(tiny_net, method):
    targets = _targets(tiny_net)
    methods = {t.name: (method if t.kind == "conv" and t.module.kernel_size != (1, 1) else "svd") for t in targets}
    ranks = {t.name: max(1, t.full_rank // 3) for t in targets}
    configured = {n: get_method(m) for n, m in methods.items()}
    ranks = {n: min(r, layer_spectrum(n, t.module.weight, configured[n]).k) for (n, r), t in zip(ranks.items(), targets)}
    glob = {n: m for n, m in methods.items()}
    res = rankslim.compress(tiny_net, "svd", methods=glob, ranks=ranks, input_shape=(1, 8, 8), keep_head=False)
    net = SpectralNet(tiny_net, targets, configured)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x, net.rank_scales(ranks)), res.model(x), atol=1e-4, rtol=1e-4)


def test_scales_reach_the_decomposition(tiny_net):
    targets = _targets(tiny_net)
    t = next(t for t in targets if t.name == "conv2")
    svd = get_method("svd")
    s = layer_spectrum(t.name, t.module.weight, svd)
    scale = torch.zeros(s.k, dtype=torch.float64)
    keep = torch.tensor([0, 2, 5])
    scale[keep] = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    w_before = t.module.weight.detach().clone()
    w = scaled_weight(t.module.weight, scale, svd)
    sv = torch.linalg.svdvals(w.double().reshape(32, -1))
    expect = (scale * s.sigma.double()).sort(descending=True).values
    torch.testing.assert_close(sv, expect, atol=1e-5, rtol=1e-4)
    assert torch.equal(w_before, t.module.weight)  # pure: the module is not touched
    # through the build stage: the built conv2 is exactly the rescaled weight at rank 3
    from rankslim import pipeline
    sel = pipeline.select(tiny_net, (1, 8, 8), "svd", include=["conv2"])
    built = pipeline.build(sel, Allocation({"conv2": 3}, scales={"conv2": scale}), inplace=False)
    layer = built.model.get_submodule("conv2")
    assert built.notes and "rescaled" in built.notes[0]
    torch.testing.assert_close(layer.weight.detach(), w, atol=1e-5, rtol=1e-4)


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g))


@pytest.mark.parametrize("method", ["svd", "spatial"])
def test_cobla_meets_both_budgets_through_compress(tiny_net, method):
    methods = {"conv3": "svd", "fc*": "svd"} if method == "spatial" else None
    for eta in (0.3, 0.6):
        res = rankslim.compress(tiny_net, method, methods=methods, params=eta, macs=eta, allocator="cobla",
                                data=_data(), calib_samples=96, input_shape=(1, 8, 8),
                                allocator_options={"maxiter": 8})
        _assert_measured_within(res.model, tiny_net, eta)


def _assert_measured_within(model, original, eta):
    """Params and FlopCounterMode MACs of the built model are at most ``eta`` times the original's."""
    x = torch.zeros(2, 1, 8, 8)
    assert count_params(model) <= eta * count_params(original)
    assert count_macs(model, x) <= eta * count_macs(original, x)


def test_cobla_refuses_unmaskable_methods_and_missing_budget(tiny_net):
    with pytest.raises(BudgetError, match="do not have"):
        rankslim.compress(tiny_net, "tucker", methods={"fc*": "svd"}, params=0.5, allocator="cobla",
                          data=_data(), input_shape=(1, 8, 8))
    with pytest.raises(BudgetError, match="loss='kl' needs calibration data"):
        rankslim.compress(tiny_net, "svd", params=0.5, allocator="cobla", input_shape=(1, 8, 8),
                          allocator_options={"loss": "kl"})


def test_cobla_data_free_weights_loss(tiny_net):
    res = rankslim.compress(tiny_net, "svd", params=0.5, macs=0.5, allocator="cobla", input_shape=(1, 8, 8),
                            allocator_options={"maxiter": 30})
    _assert_measured_within(res.model, tiny_net, 0.5)


def test_cobla_keeps_best_of_several_roundings(tiny_net):
    box = {}
    box["a"] = rankslim.compress(tiny_net, "svd", params=0.4, macs=0.4, allocator="cobla", data=_data(),
                                 calib_samples=96, input_shape=(1, 8, 8),
                                 allocator_options={"maxiter": 8, "rounding_candidates": 4}).allocation
    info = box["a"].info
    assert len(info["loss_rounded_candidates"]) == 4
    assert info["loss_rounded"] == min(info["loss_rounded_candidates"])
    assert set(box["a"].scales) == {n for n, r in box["a"].items() if r is not None}


@pytest.mark.parametrize("start", ["cptv", "uniform"])
def test_cobla_start_points(tiny_net, start):
    res = rankslim.compress(tiny_net, "svd", params=0.5, macs=0.5, allocator="cobla", data=_data(), calib_samples=96,
                            input_shape=(1, 8, 8), allocator_options={"maxiter": 5, "start": start})
    assert count_params(res.model) <= 0.5 * count_params(tiny_net)
    with pytest.raises(rankslim.OptionError, match="start"):
        rankslim.compress(tiny_net, "svd", params=0.5, allocator="cobla", data=_data(), input_shape=(1, 8, 8),
                          allocator_options={"start": "random"})
