"""ddlr and relu_admm through rankslim.compress on a small digits MLP (and a conv via im2col)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import train_on_digits
from torch import nn

import rankslim
from tests._measure import count_params
from rankslim.cost import model_cost, trace_shapes
from rankslim.data import evaluate_accuracy, load_dataset
from rankslim.errors import DataError, RankslimError
from rankslim.layers.lowrank import LowRankConv2d, LowRankLinear
from rankslim.layers.sparse import LowRankSparseLinear
from rankslim.methods import DecomposeContext, get_method
from rankslim.surgery import select_targets

SHAPE = (1, 8, 8)
HEAD = {"fc3": "linear"}  # the logits layer is not followed by a ReLU


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    net = MLP()
    return train_on_digits(net, epochs=15)


@pytest.fixture(scope="module")
def test_set():
    return load_dataset("digits", "test")


def _stats(model: nn.Module, name: str, n: int = 128, sequential: bool = False):
    from rankslim.calibrate import Calibrator
    from rankslim.data import calibration_batches
    targets, _ = select_targets(model, trace_shapes(model, SHAPE))
    t = next(t for t in targets if t.name == name)
    cal = Calibrator(model, calibration_batches("digits", n), sequential=sequential)
    return t, cal.stats_for(t, model, raw=True)


def test_ddlr_compress_end_to_end_with_round_trip(trained, test_set, tmp_path):
    res = rankslim.compress(trained, "ddlr", params=0.5, keep_head=False, input_shape=SHAPE, data="digits", calib_samples=96,
                            sequential=False, method_options={"eps": 0.05, "activation": HEAD})
    assert count_params(res.model) <= 0.5 * count_params(trained)
    replaced = [r for r in res.report.rows if r.replaced]
    assert replaced and all(isinstance(res.model.get_submodule(r.name), LowRankLinear) for r in replaced)
    for r in replaced:
        # problem (4)'s constraint holds for the solution (before truncation to the knob)
        assert r.info["ddlr_masked_error"] <= r.info["ddlr_eps"] * 1.02 + 1e-6
        assert r.info["rank"] == r.info["knob"]
        assert r.params_after == model_cost(res.model, SHAPE).layers[r.name + ".first"].params + \
            model_cost(res.model, SHAPE).layers[r.name + ".second"].params
    acc0 = evaluate_accuracy(trained, test_set)
    acc = evaluate_accuracy(res.model, test_set)
    assert acc > 0.8 * acc0
    path = rankslim.save(res.model, tmp_path / "ddlr.rankslim")
    again = rankslim.load(path, copy.deepcopy(trained))
    x = torch.randn(4, *SHAPE)
    assert torch.equal(again(x), res.model(x))


def test_ddlr_beats_svd_at_equal_rank(trained, test_set):
    """The data-aware solution keeps more accuracy than data-free SVD at the same small ranks."""
    ranks = {"fc1": 6, "fc2": 6}
    d = rankslim.compress(trained, "ddlr", ranks=ranks, keep_head=False, input_shape=SHAPE, data="digits", calib_samples=128,
                          sequential=False, method_options={"eps": 0.1, "ddlr_solver": "admm", "ddlr_max_iter": 1500})
    s = rankslim.compress(trained, "svd", ranks=ranks, keep_head=False, input_shape=SHAPE)
    assert evaluate_accuracy(d.model, test_set) > evaluate_accuracy(s.model, test_set)


def test_elbow_rule_and_eps(trained):
    """With the knob at full rank the elbow of the solution decides, and a larger eps gives a smaller rank."""
    t, stats = _stats(trained, "fc1", n=64)
    m = get_method("ddlr")
    ranks = []
    for eps in (0.02, 0.3):
        ctx = DecomposeContext(torch.Generator().manual_seed(0), stats=stats,
                               options={"eps": eps, "rank_rule": "elbow", "ddlr_solver": "admm",
                                        "ddlr_max_iter": 1500})
        layer, info = m.decompose(t, t.full_rank, ctx)
        assert layer.rank == info["rank"] == info["elbow_rank"] <= t.full_rank
        ranks.append(info["rank"])
    assert ranks[1] < ranks[0]


def test_ddlr_exact_at_zero_eps_full_rank(trained):
    """eps = 0 with the linear constraint forces U X = W X, so the full-rank layer reproduces the original."""
    t, stats = _stats(trained, "fc2", n=96)
    ctx = DecomposeContext(torch.Generator().manual_seed(0), stats=stats,
                           options={"eps": 0.0, "activation": "linear", "ddlr_solver": "cvxpy"})
    layer, _ = get_method("ddlr").decompose(t, t.full_rank, ctx)
    # on the calibration inputs (dead ReLU units leave W free on their span, so random inputs would not do)
    x = stats.X.T.to(torch.float32)
    assert torch.allclose(layer(x), t.module(x), atol=1e-3, rtol=1e-3)


def test_ddlr_on_a_conv_through_im2col():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10)).eval()
    res = rankslim.compress(net, "ddlr", ranks={"2": 12}, keep_head=False, input_shape=SHAPE, data="digits", calib_samples=16,
                            sequential=False, method_options={"eps": 0.0, "activation": "linear"})
    layer = res.model[2]
    assert isinstance(layer, LowRankConv2d)
    # full rank, eps = 0: the conv output on calibration images is reproduced (up to the solver's tolerance)
    x = load_dataset("digits", "train").tensors[0][:16]
    assert torch.allclose(res.model[:3](x), net[:3](x), atol=5e-3, rtol=1e-3)
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    from rankslim.surgery import Target
    assert "grouped" in get_method("ddlr").supports(Target("g", grouped, "conv", (8, 8, 8), (8, 6, 6)))


def test_relu_admm_end_to_end_with_sparse_part(trained, test_set, tmp_path):
    res = rankslim.compress(trained, "relu_admm", ranks={"fc1": 8, "fc2": 8}, keep_head=False, input_shape=SHAPE, data="digits",
                            calib_samples=128, sequential=False,
                            method_options={"lam_rank": 0.01, "lam_sparse": 0.01, "a_columns": 0.05})
    fc1 = res.model.fc1
    info = {r.name: r.info for r in res.report.rows if r.replaced}
    assert info["fc1"]["a_columns"] <= info["fc1"]["a_column_cap"]
    # what was built never costs more than the plan's cost(target, knob)
    built = model_cost(res.model, SHAPE).layers
    for r in res.report.rows:
        if r.replaced:
            parts = [c for n, c in built.items() if n.startswith(r.name + ".")]
            assert sum(c.params for c in parts) <= r.params_after
            assert sum(c.macs for c in parts) <= r.macs_after
    if info["fc1"]["a_columns"]:
        assert isinstance(fc1, LowRankSparseLinear)
        cols = fc1.sparse.mask.any(0)
        assert int(cols.sum()) == info["fc1"]["a_columns"]  # A is column-sparse
    assert evaluate_accuracy(res.model, test_set) > 0.5
    path = rankslim.save(res.model, tmp_path / "ra.rankslim")
    again = rankslim.load(path, copy.deepcopy(trained))
    x = torch.randn(4, *SHAPE)
    assert torch.equal(again(x), res.model(x))


def test_relu_admm_layer_is_a_plus_b(trained):
    t, stats = _stats(trained, "fc1")
    ctx = DecomposeContext(torch.Generator().manual_seed(0), stats=stats,
                           options={"lam_rank": 0.01, "lam_sparse": 0.005, "a_columns": 4})
    layer, info = get_method("relu_admm").decompose(t, 10, ctx)
    assert info["a_columns"] > 0 and isinstance(layer, LowRankSparseLinear)
    x = torch.randn(5, 64)
    dense = layer.weight  # U V + S, the represented A + B
    assert torch.allclose(layer(x), x @ dense.T + layer.bias, atol=1e-5)
    # cost is increasing in the knob and bounds what was built
    m = get_method("relu_admm")
    costs = [m.cost(t, r).params for r in range(1, t.full_rank + 1)]
    assert all(a < b for a, b in zip(costs, costs[1:]))
    built = model_cost(nn.Sequential(layer), (64,)).total.params
    assert built <= m.cost(t, 10).params


def test_clear_errors(trained):
    t, _ = _stats(trained, "fc1", n=16)
    ctx = DecomposeContext(torch.Generator().manual_seed(0), stats=None)
    with pytest.raises(DataError):
        get_method("ddlr").decompose(t, 4, ctx)
    _, stats = _stats(trained, "fc1", n=16)
    with pytest.raises(RankslimError):
        get_method("ddlr").decompose(t, 4, DecomposeContext(torch.Generator(), stats=stats,
                                                            options={"rank_rule": "best"}))
    with pytest.raises(RankslimError):
        get_method("ddlr").decompose(t, 4, DecomposeContext(torch.Generator(), stats=stats,
                                                            options={"activation": "tanh"}))
    with pytest.raises(RankslimError):
        rankslim.compress(trained, "ddlr", ratio=0.5, keep_head=False, input_shape=SHAPE)  # no data


def test_relu_admm_on_a_conv():
    from rankslim.layers.sparse import LowRankSparseConv2d
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10)).eval()
    res = rankslim.compress(net, "relu_admm", ranks={"2": 4}, keep_head=False, input_shape=SHAPE, data="digits", calib_samples=16,
                            sequential=False, method_options={"lam_rank": 0.01, "lam_sparse": 0.001, "a_columns": 3})
    layer = res.model[2]
    info = res.report.rows[[r.name for r in res.report.rows].index("2")].info
    assert isinstance(layer, (LowRankSparseConv2d, LowRankConv2d))
    if isinstance(layer, LowRankSparseConv2d):
        assert int(layer.sparse.mask.flatten(1).any(0).sum()) == info["a_columns"] <= 3
    # the module computes the conv with its dense-equivalent kernel A + B (stride/padding kept)
    x = torch.randn(2, 8, 8, 8)
    ref = nn.functional.conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    assert torch.allclose(layer(x), ref, atol=1e-5)
