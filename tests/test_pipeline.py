"""The stages of rankslim.pipeline: output heads, data-aware allocation spectra, stage reuse."""
from __future__ import annotations

import torch
from torch import nn

import rankslim
from rankslim import pipeline
from rankslim.allocate import Budget, get_allocator
from tests._measure import count_params


class LogSoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x.flatten(1)))), dim=1)


class NormAfterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(16, 32), nn.Linear(32, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


def test_heads_found_by_identity_view_and_activation(tiny_net):
    from rankslim.cost import make_input
    assert pipeline.find_heads(tiny_net, make_input((1, 8, 8), 1)) == ["fc2"]
    assert pipeline.find_heads(LogSoftmaxNet().eval(), torch.zeros(1, 1, 8, 8)) == ["fc2"]
    # a residual + LayerNorm after the last Linear: its output is not the model's output
    assert pipeline.find_heads(NormAfterLinear().eval(), torch.zeros(2, 5, 16)) == []


def test_head_kept_dense_by_default_and_compressible_on_request():
    spec = rankslim.zoo.resolve_model("zoo:lenet5")
    res = rankslim.compress(spec.model, params=0.5, input_shape=spec.input_shape)
    assert isinstance(res.model.fc3, nn.Linear) and torch.equal(res.model.fc3.weight, spec.model.fc3.weight)
    assert any(s["name"] == "fc3" and "head" in s["reason"] for s in res.report.skipped)
    assert count_params(res.model) <= 0.5 * count_params(spec.model)
    explicit = rankslim.compress(spec.model, ranks={"fc3": 4}, input_shape=spec.input_shape, keep_head=False)
    assert not isinstance(explicit.model.fc3, nn.Linear)


def test_undetected_classifier_never_below_its_classes():
    """An auxiliary 10-way classifier that is not the model's output keeps >= 10 ranks under any budget."""
    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux, self.head = nn.Linear(64, 64), nn.Linear(64, 10), nn.Linear(64, 10)

        def forward(self, x):
            h = torch.relu(self.body(x.flatten(1)))
            return self.head(h) + 0.0 * self.aux(h)

    res = rankslim.compress(Aux().eval(), params=0.6, input_shape=(1, 8, 8))
    aux = res.model.aux
    assert isinstance(aux, nn.Linear) or min(aux.first.weight.shape) >= 10


def _stats_of(model, name, batches):
    """Inputs of layer ``name`` over ``batches`` (a hook: independent of the calibrator)."""
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(got).double()


def test_data_spectrum_predicts_the_output_error_zhang_builds():
    """Truncating the whitened spectrum at r loses exactly its tail energy of ‖(W − Ŵ)X‖²/n (Zhang et al.)."""
    spec = rankslim.zoo.resolve_model("zoo:lenet5")
    sel = pipeline.select(spec.model, spec.input_shape, "zhang", method_options={"damping": 1e-9}, include=["fc1"])
    cal = pipeline.calibrate(sel, "fashion-mnist", calib_samples=256, sequential=False)
    table = pipeline.cost_table(sel, cal)
    sigma = table.layers[0].sigma
    r = 12
    built = pipeline.build(sel, rankslim.Allocation({"fc1": r}), cal, inplace=False)
    X = _stats_of(spec.model, "fc1", cal.batches)
    W = spec.model.fc1.weight.double()
    W_hat = built.model.fc1.weight.detach().double()
    measured = float(((X @ (W - W_hat).T) ** 2).sum()) / X.shape[0]
    predicted = float((sigma[r:] ** 2).sum())
    assert abs(measured - predicted) <= 0.02 * predicted
    # and it is not the data-free spectrum
    free = torch.linalg.svdvals(W)
    assert not torch.allclose(sigma / sigma[0], free / free[0], atol=1e-2)


def test_stages_reused_for_several_budgets():
    """select/calibrate/cost_table once, allocate+build per budget: every built model meets its budget."""
    spec = rankslim.zoo.resolve_model("zoo:lenet5")
    sel = pipeline.select(spec.model, spec.input_shape, "svd")
    table = pipeline.cost_table(sel, None, quantities=("params",))
    before = count_params(spec.model)
    for f in (0.6, 0.4, 0.25):
        alloc = pipeline.allocate(sel, table, get_allocator("cptv"), Budget(params=f))
        model = pipeline.build(sel, alloc, inplace=False).model
        assert count_params(model) <= f * before
    # building on copies never touched the selection's working model nor the user's model
    assert all(isinstance(t.module, (nn.Conv2d, nn.Linear)) for t in sel.targets)
    assert type(sel.model.fc1) is nn.Linear and type(spec.model.fc1) is nn.Linear


def test_speed_aware_keeps_slower_layers_dense(monkeypatch, tmp_path):
    """With made-up timings (factorized never faster for one layer), that layer stays dense and the budget is met."""
    import pytest
    from rankslim import latency_cache
    slow = {"name": "conv2"}

    def fake(method, target, ranks, **kw):
        is_slow = target.name == slow["name"]
        return {"dense": 1.0, "ranks": {int(r): (2.0 if is_slow else 0.1 + 0.001 * r) for r in ranks}}
    monkeypatch.setattr(latency_cache, "measure_layer", fake)
    spec = rankslim.zoo.resolve_model("zoo:lenet5")
    res = rankslim.compress(spec.model, params=0.5, input_shape=spec.input_shape, speed_aware=True)
    assert type(res.model.conv2) is nn.Conv2d and torch.equal(res.model.conv2.weight, spec.model.conv2.weight)
    assert not isinstance(res.model.fc1, nn.Linear)
    assert count_params(res.model) <= 0.5 * count_params(spec.model)
    assert res.report.metrics["speed_aware"]["never_faster"] == ["conv2"]
    # fc1 holds most parameters: if it is never faster a small budget cannot be met, and the refusal says so
    slow["name"] = "fc1"
    with pytest.raises(rankslim.BudgetError, match="cannot be met"):
        rankslim.compress(spec.model, params=0.5, input_shape=spec.input_shape, speed_aware=True)
    with pytest.raises(rankslim.OptionError, match="speed_aware takes"):
        rankslim.compress(spec.model, params=0.7, input_shape=spec.input_shape, speed_aware={"batchsize": 2})
