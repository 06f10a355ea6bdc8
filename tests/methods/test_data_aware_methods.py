"""prune, prune-data, zhang, godec, grebdec(-ls) through rankslim.compress on a small digits conv net."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import train_on_digits
from torch import nn

import rankslim
from tests._measure import count_params
from rankslim.cost import model_cost
from rankslim.data import evaluate_accuracy, load_dataset
from rankslim.layers.sparse import SparseConv2d
from rankslim.methods import get_method

METHODS = ["prune", "prune-data", "zhang", "godec", "grebdec", "grebdec-ls"]


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 24, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv2d(24, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = _net()
    return train_on_digits(net, epochs=8)


@pytest.mark.parametrize("method", METHODS)
def test_compress_meets_budget_and_round_trips(trained, method, tmp_path):
    res = rankslim.compress(trained, method, params=0.4, keep_head=False, input_shape=(1, 8, 8), data="digits", calib_samples=128)
    assert count_params(res.model) <= 0.4 * count_params(trained)  # measured, COO non-zeros counted as 2
    # the cost the allocator planned is what the built layers report
    built = model_cost(res.model, (1, 8, 8)).layers
    for row in res.report.rows:
        if row.replaced:
            parts = [c for n, c in built.items() if n == row.name or n.startswith(row.name + ".")]
            assert sum(c.params for c in parts) == row.params_after
            assert sum(c.macs for c in parts) == row.macs_after
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    again = rankslim.load(path, copy.deepcopy(trained))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(again(x), res.model(x))
    assert evaluate_accuracy(res.model, load_dataset("digits", "test")) > 0.3


def test_data_aware_beats_data_free_at_equal_size(trained):
    test = load_dataset("digits", "test")
    acc = {}
    for m in ("prune", "prune-data", "godec", "grebdec"):
        r = rankslim.compress(trained, m, params=0.3, keep_head=False, input_shape=(1, 8, 8), data="digits", calib_samples=256)
        acc[m] = evaluate_accuracy(r.model, test)
    assert acc["prune-data"] > acc["prune"]
    assert acc["grebdec"] > acc["godec"]


def test_grebdec_uses_sparse_model_on_pointwise_convs(trained):
    r = rankslim.compress(trained, "grebdec", params=0.5, keep_head=False, input_shape=(1, 8, 8), data="digits", calib_samples=64)
    assert isinstance(r.model[4], SparseConv2d)
    info = {row.name: row.info for row in r.report.rows}
    assert info["4"]["model"].startswith("sparse") and "sparse_note" in info["4"]
    assert info["2"]["objective_final"] <= info["2"]["objective_first"]


@pytest.mark.parametrize("method", ["godec", "grebdec", "prune"])
def test_cost_is_increasing_in_the_knob(trained, method):
    from rankslim.cost import trace_shapes
    from rankslim.surgery import select_targets
    m = get_method(method)
    for t in select_targets(trained, trace_shapes(trained, (1, 8, 8)))[0]:
        costs = [m.cost(t, r) for r in range(1, m.max_rank(t) + 1)]
        assert all(b.params > a.params and b.macs >= a.macs for a, b in zip(costs, costs[1:]))
        svd = get_method("svd").cost(t, 3)
        assert abs(m.cost(t, 3).params - svd.params) <= 1  # equal size at equal knob


@pytest.mark.parametrize("method", ["prune-data", "zhang", "grebdec"])
def test_missing_statistics_is_a_clear_error(trained, method):
    from rankslim.cost import trace_shapes
    from rankslim.errors import RankslimError
    from rankslim.methods import DecomposeContext
    from rankslim.surgery import select_targets
    t = select_targets(trained, trace_shapes(trained, (1, 8, 8)))[0][1]
    with pytest.raises(RankslimError, match="calibration statistics"):
        get_method(method).decompose(t, 4, DecomposeContext(generator=torch.Generator().manual_seed(0)))
