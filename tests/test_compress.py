"""compress(): budgets, selection, rounding, the input model untouched, and every refusal."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import rankslim
from rankslim.layers import LowRankConv2d, LowRankLinear
from rankslim.zoo import get_zoo_model

from ._measure import count_macs, count_params


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# vgg11's 25088x4096 classifier takes ~40 s to decompose on one core: it is left out here (the MACs
# budget is still over the whole model) and covered by benchmarks/svd_baseline.py (vgg16, resnet50).
@pytest.mark.parametrize("name,budget,exclude", [("resnet18", {"macs": 0.5}, None),
                                                 ("vgg11", {"macs": 0.4}, ["classifier.*"]),
                                                 ("mobilenet_v2", {"params": 0.8, "macs": 0.8}, None)])
def test_budgets_met_on_torchvision(name, budget, exclude):
    model = torchvision.models.get_model(name, weights=None).eval()
    shape = (3, 64, 64)
    res = rankslim.compress(model, input_shape=shape, exclude=exclude, **budget)
    x = torch.randn(2, *shape)
    measured = {"params": count_params(res.model) / count_params(model),
                "macs": count_macs(res.model, x) / count_macs(model, x)}
    for q, limit in budget.items():
        assert measured[q] <= limit
    # the budget is used, not wasted: within a few percent of the requested fraction
    q = next(iter(budget))
    assert measured[q] > budget[q] - 0.05
    with torch.no_grad():
        out = res.model(x)
        assert out.shape == model(x).shape and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("spec", ["zoo:resnet20", "zoo:lenet5"])
@pytest.mark.parametrize("macs", [0.7, 0.3])
def test_budgets_met_on_reference_models(spec, macs):
    res = rankslim.compress(spec, macs=macs, params=macs)
    original = get_zoo_model(spec.split(":")[1])
    x = torch.zeros(2, 1, 28, 28)
    assert count_macs(res.model, x) <= macs * count_macs(original, x)
    assert count_params(res.model) <= macs * count_params(original)
    assert res.plan.model_spec == spec


def test_input_model_is_untouched(tiny_net):
    before = copy.deepcopy(tiny_net)
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    assert _state_equal(before, tiny_net)
    assert isinstance(tiny_net.conv2, nn.Conv2d) and isinstance(tiny_net.fc1, nn.Linear)
    assert res.model is not tiny_net
    assert any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in res.model.modules())


def test_inplace_edits_the_model(tiny_net):
    res = rankslim.compress(tiny_net, ratio=0.25, input_shape=(1, 8, 8), inplace=True)
    assert res.model is tiny_net
    assert isinstance(tiny_net.fc1, LowRankLinear)


def test_grouped_convs_are_skipped_with_reason(tiny_net):
    res = rankslim.compress(tiny_net, ratio=0.5, input_shape=(1, 8, 8))
    reasons = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "depthwise" in reasons["dw"]
    assert isinstance(res.model.dw, nn.Conv2d)


def test_include_exclude_min_params(tiny_net):
    res = rankslim.compress(tiny_net, ratio=0.25, input_shape=(1, 8, 8), include=["fc*", "conv*"],
                            exclude=["fc2"], min_params=300)
    names = {r.name for r in res.report.rows}
    assert "fc2" not in names and "conv1" not in names  # conv1 has 144 weights
    assert {"conv2", "fc1"} <= names
    assert any(s["name"] == "fc2" and "excluded" in s["reason"] for s in res.report.skipped)


def test_round_to_gives_multiples(tiny_net):
    res = rankslim.compress(tiny_net, params=0.6, input_shape=(1, 8, 8), round_to=4)
    # ranks read off the built layers: the inner width of each U @ V pair
    built = {n: m for n, m in res.model.named_modules() if isinstance(m, (LowRankConv2d, LowRankLinear))}
    assert built
    for name, layer in built.items():
        w = tiny_net.get_submodule(name).weight
        full = min(w.shape[0], w[0].numel())
        rank = layer.first.weight.shape[0]
        assert rank % 4 == 0 or rank == full, (name, rank, full)


def test_layer_kept_dense_when_not_cheaper():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    res = rankslim.compress(model, ratio=1.0, input_shape=(64,))
    # rank 64 of 64x64 costs 64*128 > 64*64: no replacement, the model stays exact
    assert all(r.method == "dense" for r in res.report.rows)
    x = torch.randn(3, 64)
    torch.testing.assert_close(res.model(x), model(x))


def test_explicit_full_rank_is_exact(tiny_net):
    res = rankslim.compress(tiny_net, ranks={"conv2": 32, "fc1": 64}, input_shape=(1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(res.model(x), tiny_net(x), rtol=1e-4, atol=1e-5)


def test_infeasible_budget_is_refused(tiny_net):
    with pytest.raises(rankslim.BudgetError, match="smallest reachable"):
        rankslim.compress(tiny_net, params=0.01, input_shape=(1, 8, 8))
    with pytest.raises(rankslim.BudgetError, match="fraction"):
        rankslim.compress(tiny_net, params=1.5, input_shape=(1, 8, 8))
    with pytest.raises(rankslim.BudgetError, match="budget"):
        rankslim.compress(tiny_net, input_shape=(1, 8, 8))


def test_impossible_rank_is_refused(tiny_net):
    with pytest.raises(rankslim.RankError, match=r"\[1, 10\]"):
        rankslim.compress(tiny_net, ranks={"fc2": 11}, input_shape=(1, 8, 8), keep_head=False)
    with pytest.raises(rankslim.RankError, match="no target layer"):
        rankslim.compress(tiny_net, ranks={"nope*": 3}, input_shape=(1, 8, 8))


def test_nan_weights_are_detected(tiny_net):
    with torch.no_grad():
        tiny_net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(rankslim.InvalidWeightsError, match="fc1.weight"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))


def test_inf_buffer_is_detected(tiny_net):
    tiny_net.bn1.running_var[0] = float("inf")
    with pytest.raises(rankslim.InvalidWeightsError, match="running_var"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))


def test_wrong_input_shape(tiny_net):
    with pytest.raises(rankslim.InputShapeError):
        rankslim.compress(tiny_net, params=0.5, input_shape=(3, 32, 32))


def test_energy_mode_keeps_energy(tiny_net):
    res = rankslim.compress(tiny_net, energy=0.9, input_shape=(1, 8, 8))
    for row in res.report.rows:
        if row.method != "svd":
            continue
        w = tiny_net.get_submodule(row.name).weight.detach().double()
        s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        r = int(row.rank)
        kept = float((s[:r] ** 2).sum() / (s ** 2).sum())
        assert kept >= 0.9 - 1e-9
        assert r == 1 or float((s[: r - 1] ** 2).sum() / (s ** 2).sum()) < 0.9


def test_transformer_linears_compress():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.Sequential(layer).eval()
    res = rankslim.compress(model, params=0.7, input_shape=(6, 32))
    names = {r.name for r in res.report.rows}
    assert "0.linear1" in names and "0.linear2" in names
    assert any("MultiheadAttention" in s["type"] for s in res.report.skipped)
    x = torch.randn(2, 6, 32)
    assert res.model(x).shape == (2, 6, 32)
    # modules that read a child's .weight directly see the dense equivalent
    lr = res.model[0].linear1
    torch.testing.assert_close(lr.weight, lr.second.weight @ lr.first.weight)


def test_empty_calibration_data_is_refused(tiny_net):
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(rankslim.DataError):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), data=empty)


def test_cobla_scales_reach_the_weights_unless_disabled(tiny_net):
    kw = dict(params=0.5, input_shape=(1, 8, 8), allocator="cobla", data="digits", calib_samples=64, keep_head=False)
    scaled = rankslim.compress(tiny_net, **kw)
    plain = rankslim.compress(tiny_net, allocator_options={"scale": False}, **kw)
    assert any("rescaled" in n for n in scaled.report.notes)
    assert not any("rescaled" in n for n in plain.report.notes)
    assert [r.rank for r in scaled.report.rows] == [r.rank for r in plain.report.rows]
    assert count_params(scaled.model) <= 0.5 * count_params(tiny_net)
    # the scales change the weights, so the two models differ while having the same shapes
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(scaled.model(x), plain.model(x))


def test_keep_stem_leaves_image_convs_dense(tiny_net):
    res = rankslim.compress(tiny_net, ratio=0.5, input_shape=(1, 8, 8), keep_stem=True)
    assert isinstance(res.model.conv1, nn.Conv2d)
    assert any(s["name"] == "conv1" and "stem" in s["reason"] for s in res.report.skipped)


def test_budget_free_allocator_needs_no_budget(tiny_net):
    res = rankslim.compress(tiny_net, allocator="vbmf", input_shape=(1, 8, 8))
    assert res.report.allocator == "vbmf" and res.report.rows
    with pytest.raises(rankslim.BudgetError):
        rankslim.compress(tiny_net, allocator="cptv", input_shape=(1, 8, 8))
