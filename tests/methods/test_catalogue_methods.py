"""The catalogue methods (spatial, tucker, cp, tt) through the whole pipeline: exact costs, budgets, save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rankslim
from tests._measure import count_params
from rankslim.cost import flop_counter_macs, model_cost, trace_shapes
from rankslim.errors import RankError
from rankslim.methods import DecomposeContext, get_method
from rankslim.methods.tucker import evbmf_knobs, knob_to_ranks
from rankslim.surgery import select_targets


class ConvNet(nn.Module):
    """Conv-dominated net on 3x12x12 inputs: square/non-square kernels, stride, dilation, reflect padding, a 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(32, 32, (3, 5), padding=(2, 4), dilation=(2, 2), padding_mode="reflect")
        self.conv4 = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = self.conv4(x).mean((2, 3))
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 120)
        self.fc2 = nn.Linear(120, 64, bias=False)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


CONV_SHAPE = (3, 12, 12)
MLP_SHAPE = (256,)


def _model(method: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return (MLP().eval(), MLP_SHAPE) if method == "tt" else (ConvNet().eval(), CONV_SHAPE)


def _targets(model: nn.Module, shape: tuple[int, ...], method: str):
    m = get_method(method)
    targets, _ = select_targets(model, trace_shapes(model, shape))
    return m, [t for t in targets if m.supports(t) is None]


@pytest.mark.parametrize("method", ["spatial", "tucker", "cp", "tt"])
def test_cost_is_exact_and_increasing(method: str) -> None:
    model, shape = _model(method)
    m, targets = _targets(model, shape, method)
    assert targets
    for t in targets:
        kmax = m.max_rank(t)
        costs = [m.cost(t, r) for r in range(1, kmax + 1)]
        assert all(b.params > a.params and b.macs >= a.macs for a, b in zip(costs, costs[1:])), t.name
        sig = m.spectrum(t)
        assert sig.shape == (kmax,) and bool((sig[:-1] >= sig[1:]).all()) and bool((sig >= 0).all())
        for r in sorted({1, max(1, kmax // 3), kmax}):
            ctx = DecomposeContext(generator=torch.Generator().manual_seed(0), options={"n_iter": 3})
            layer, info = m.decompose(t, r, ctx)
            c = m.cost(t, r)
            in_shape = tuple(t.in_shape)
            assert model_cost(layer, in_shape).total == c, (t.name, r)
            assert flop_counter_macs(layer, in_shape) == c.macs, (t.name, r)
            assert layer(torch.randn(2, *in_shape)).shape[1:] == tuple(t.out_shape)
            assert info["rank"] == r


@pytest.mark.parametrize("method", ["spatial", "tucker", "tt"])
def test_full_knob_reproduces_the_model(method: str) -> None:
    model, shape = _model(method)
    m, targets = _targets(model, shape, method)
    res = rankslim.compress(model, method, ranks={t.name: m.max_rank(t) for t in targets}, keep_head=False, input_shape=shape)
    x = torch.randn(4, *shape)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,budget", [("spatial", 0.5), ("tucker", 0.5), ("cp", 0.5), ("tt", 0.5),
                                           ("tucker", 0.25)])
def test_compress_meets_budget_and_round_trips(method: str, budget: float, tmp_path) -> None:
    model, shape = _model(method)
    res = rankslim.compress(model, method, params=budget, keep_head=False, input_shape=shape, method_options={"n_iter": 20} if method == "cp" else None)
    kept = count_params(res.model) / count_params(model)  # measured on the built module, ties counted once
    assert kept <= budget + 1e-9
    # the spectra give CPTV something to work with on every knob step: the budget is used, not wasted
    assert kept >= 0.85 * budget
    used = {row.method for row in res.report.rows}
    assert method in used
    # the report's costs are the built model's costs
    assert model_cost(res.model, shape).total.params == res.report.compressed.params
    assert flop_counter_macs(res.model, shape) == res.report.compressed.macs
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    fresh, _ = _model(method)
    loaded = rankslim.load(path, fresh)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))


def test_per_layer_mix_and_tucker_ranks_in_report() -> None:
    model, shape = _model("tucker")
    res = rankslim.compress(model, "tucker", params=0.6, keep_head=False, input_shape=shape,
                            methods={"conv3": "spatial", "conv2": "cp", "fc": "svd"})
    by_name = {r.name: r for r in res.report.rows}
    assert by_name["conv3"].method in ("spatial", "dense")
    plan = {lp.name: lp for lp in res.plan.layers}
    for name, lp in plan.items():
        if lp.method == "tucker":
            t = next(t for t in _targets(model, shape, "tucker")[1] if t.name == name)
            assert lp.info["ranks"] == list(knob_to_ranks(t, lp.info["rank"]))


def test_unsupported_layers_are_skipped_with_reasons() -> None:
    model, shape = _model("cp")
    res = rankslim.compress(model, "cp", params=0.8, keep_head=False, input_shape=shape)
    reasons = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "1x1" in reasons["conv4"] and "Linear" in reasons["fc"]
    mlp, mshape = _model("tt")
    with pytest.raises(rankslim.RankslimError, match="no layer"):
        rankslim.compress(mlp, "tucker", params=0.5, keep_head=False, input_shape=mshape)


def test_cp_memory_guard_through_the_api() -> None:
    model, shape = _model("cp")
    with pytest.raises(RankError, match="conv.*GiB"):
        rankslim.compress(model, "cp", params=0.5, keep_head=False, input_shape=shape, method_options={"max_bytes": 10_000})


def test_evbmf_knobs_are_budget_free_tucker_ranks() -> None:
    model, shape = _model("tucker")
    # plant low multilinear rank in conv3 so EVBMF has something to find
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        core = torch.randn(6, 4, 3, 5, generator=g)
        U4, U3 = torch.linalg.qr(torch.randn(32, 6, generator=g))[0], torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
        model.conv3.weight.copy_(torch.einsum("rsij,nr,cs->ncij", core, U4, U3) + 1e-3 * torch.randn(32, 32, 3, 5))
    knobs = evbmf_knobs(model, shape)
    m, targets = _targets(model, shape, "tucker")
    t3 = next(t for t in targets if t.name == "conv3")
    assert m.evbmf_ranks(t3) == (4, 6)
    r3, r4 = knob_to_ranks(t3, knobs["conv3"])
    assert r3 >= 4 and r4 >= 6
    res = rankslim.compress(model, "tucker", ranks=knobs, keep_head=False, input_shape=shape)
    assert {lp.name for lp in res.plan.layers} == set(knobs)


def test_evbmf_knobs_for_svd_is_the_matrix_rank_rule() -> None:
    torch.manual_seed(0)
    mlp = MLP().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        mlp.fc1.weight.copy_(torch.randn(120, 7, generator=g) @ torch.randn(7, 256, generator=g) / 8
                             + 1e-3 * torch.randn(120, 256, generator=g))
    knobs = evbmf_knobs(mlp, MLP_SHAPE, method="svd")
    assert knobs["fc1"] == 7
    res = rankslim.compress(mlp, "svd", ranks=knobs, keep_head=False, input_shape=MLP_SHAPE)
    assert {lp.name: lp.info["rank"] for lp in res.plan.layers}["fc1"] == 7
