"""compress(latency=F): the compressed model's measured time at most F of the original's.

Timings are fabricated (``latency_cache._time_module`` patched, the one function that times both the layers and the
whole models) by an additive rule computed on the module itself: MACs (counted by tests/_measure.py) plus a fixed
per-call overhead for every module holding parameters.  The rule makes factorizing small layers slower than dense,
is linear in the rank between sampled ranks and makes the whole model's time exactly the sum of its layers' (the cost
model's assumptions), so the (fake) measured fraction of the built model can be checked independently of the
library's cost model.  Each test has its own empty latency cache.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import rankslim
from rankslim import latency_cache
from rankslim.cli import app
from rankslim.errors import BudgetError, OptionError
from rankslim.layers.lowrank import LowRankConv2d, LowRankLinear
from rankslim.plan import Plan
from tests._measure import count_macs, count_params
from tests.conftest import TinyNet

SHAPE = (1, 8, 8)
TINY = "tests.conftest:TinyNet"
OVERHEAD = 3000  # MAC-equivalents per layer call: a thin factorized pair pays it twice
runner = CliRunner()


def fake_time(module: nn.Module, x: torch.Tensor) -> float:
    """The fabricated median ms of ``module`` on ``x`` (see the module docstring)."""
    calls = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return (count_macs(module, x[:1]) + OVERHEAD * len(calls)) / 1e5


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Fabricated timings and an empty latency cache of this test; returns the list of (timed module, batch)."""
    monkeypatch.setenv(latency_cache.CACHE_ENV, str(tmp_path / "latency"))
    seen: list[tuple[nn.Module, int]] = []

    def fake(module, x, runtime, threads, warmup, repeats):
        seen.append((module, int(x.shape[0])))
        return fake_time(module, x)
    monkeypatch.setattr(latency_cache, "_time_module", fake)
    return seen


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def _fraction(model: nn.Module, original: nn.Module) -> float:
    x = torch.zeros(1, *SHAPE)
    return fake_time(model, x) / fake_time(original, x)


@pytest.mark.parametrize("latency", [0.4, 0.6, 0.8])
def test_latency_budget_is_met_by_the_measured_time(timed, latency):
    net = _net()
    res = rankslim.compress(net, latency=latency, input_shape=SHAPE)
    got = _fraction(res.model, net)  # independent: the fabricated timer on the built model
    assert got <= latency
    lat = res.report.metrics["latency"]
    assert lat["requested"] == latency
    assert lat["measured"] == pytest.approx(got, rel=1e-9)
    # the fabricated times are additive, so the cost model predicts the built model exactly
    assert lat["predicted"] == pytest.approx(got, rel=1e-6)
    assert lat["over"] is False
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "latency budget" and mode["latency"] == latency
    assert (mode["runtime"], mode["batch"], mode["threads"]) == ("eager", 1, torch.get_num_threads())
    assert any(r.replaced for r in res.report.rows)
    text = res.report.to_markdown()
    assert "allocation: latency budget (eager, batch 1" in text and "latency: measured" in text
    json.dumps(res.report.to_dict())  # report.json and the plan stay serialisable
    assert Plan.from_json(res.plan.to_json()).layers


def test_ranks_stand_for_the_fastest_measured_rank_at_or_above_them(timed, monkeypatch):
    from rankslim import pipeline
    from rankslim.allocate import get_allocator
    from rankslim.latency_budget import allocate_latency, latency_model

    sel = pipeline.select(_net(), SHAPE, "svd")
    table = pipeline.cost_table(sel, None, quantities=("macs",))
    name = max(table.layers, key=lambda lo: lo.max_rank).name  # fc1: 64 ranks, sampled 1, 2, ..., 8, 16, ...
    real = latency_cache.measure_targets

    def kernels_like_multiples_of_8(*a, **k):
        got = real(*a, **k)
        m = got[name]  # sampled ranks that are not multiples of 8 run slower than the next multiple of 8
        m["ranks"] = {r: t + (0.5 * m["dense"] if r % 8 else 0.0) for r, t in m["ranks"].items()}
        return got
    monkeypatch.setattr(latency_cache, "measure_targets", kernels_like_multiples_of_8)
    model = latency_model(sel, table)
    lo = model.table.by_name()[name]
    assert model.rank_of(name, 3) == 8 and model.rank_of(name, 8) == 8
    costs = [lo.cost_fn(r) for r in range(1, lo.max_rank + 1)]
    assert all(a.macs <= b.macs for a, b in zip(costs, costs[1:]))  # non-decreasing: what allocators assume
    assert lo.cost_fn(3) == lo.cost_fn(8)  # knob 3 costs what rank 8 (the rank it stands for) costs
    alloc = allocate_latency(sel, model, get_allocator("cptv"), 0.6)
    assert alloc[name] is None or alloc[name] >= 8  # never a slow odd rank below 8
    assert model.fraction(alloc) <= 0.6


def test_an_infeasible_latency_budget_names_the_smallest_reachable_fraction(timed):
    net = _net()
    with pytest.raises(BudgetError, match=r"latency budget 0\.05 cannot be met: the smallest time fraction the "
                                          r"measurements allow is (\d\.\d{4})") as err:
        rankslim.compress(net, latency=0.05, input_shape=SHAPE)
    smallest = float(re.search(r"allow is (\d\.\d{4})", str(err.value)).group(1))
    assert 0.05 < smallest < 1
    # the printed value (rounded up) can be asked for, and the model then measures at most that
    res = rankslim.compress(net, latency=smallest, input_shape=SHAPE)
    assert _fraction(res.model, net) <= smallest
    assert res.report.metrics["allocation_mode"]["smallest"] == pytest.approx(smallest, abs=1e-4)
    with pytest.raises(BudgetError, match="smallest time fraction"):
        rankslim.compress(net, latency=smallest - 2e-4, input_shape=SHAPE)


def test_smallest_fraction_is_every_layer_at_its_fastest_measured_rank(timed):
    from rankslim import pipeline
    from rankslim.latency_budget import latency_model

    sel = pipeline.select(_net(), SHAPE, "svd")
    model = latency_model(sel, pipeline.cost_table(sel, None, quantities=("macs",)))
    fastest = latency_cache.fastest_ranks(model.table, model.measured)
    assert model.smallest == pytest.approx(model.fraction(fastest), abs=1e-6)
    assert model.rest_ms > 0 and model.original_ms == pytest.approx(model.rest_ms + model.targets_dense_ms)


def test_latency_with_a_params_budget_holds_both(timed):
    net = _net()
    alone = rankslim.compress(net, latency=0.8, input_shape=SHAPE)
    p_alone = count_params(alone.model) / count_params(net)
    params = round(0.7 * p_alone, 3)  # tighter than what the latency budget alone keeps: params binds
    res = rankslim.compress(net, latency=0.8, params=params, input_shape=SHAPE)
    assert count_params(res.model) <= params * count_params(net)
    assert _fraction(res.model, net) <= 0.8
    assert res.report.budget == {"params": params, "macs": None, "ratio": None, "energy": None, "latency": 0.8}
    # and the other way round: a loose params budget, the latency binds
    res = rankslim.compress(net, latency=0.5, params=0.9, input_shape=SHAPE)
    assert count_params(res.model) <= 0.9 * count_params(net) and _fraction(res.model, net) <= 0.5


def test_latency_and_params_that_cannot_hold_together_are_refused(timed):
    with pytest.raises(BudgetError, match="params"):
        rankslim.compress(_net(), latency=0.9, params=0.01, input_shape=SHAPE)


def test_latency_with_a_macs_budget_holds_both(timed):
    net = _net()
    x = torch.zeros(1, *SHAPE)
    alone = rankslim.compress(net, latency=0.8, input_shape=SHAPE)
    m_alone = count_macs(alone.model, x) / count_macs(net, x)
    macs = round(0.8 * m_alone, 3)  # tighter than what the latency budget alone keeps: macs binds
    res = rankslim.compress(net, latency=0.8, macs=macs, input_shape=SHAPE)
    assert count_macs(res.model, x) <= macs * count_macs(net, x)  # counted independently of the library
    assert _fraction(res.model, net) <= 0.8
    assert res.report.budget["macs"] == macs and res.report.budget["latency"] == 0.8
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "latency budget" and mode["macs"] == macs
    # the other way round: a loose macs budget, the time binds; the time fraction is then at most the MAC one
    res = rankslim.compress(net, latency=0.5, macs=0.9, input_shape=SHAPE)
    assert count_macs(res.model, x) <= 0.9 * count_macs(net, x) and _fraction(res.model, net) <= 0.5


def test_latency_with_macs_is_at_least_as_fast_as_macs_alone(timed):
    # the point of the pair: at one MAC budget, a time budget picks layers whose cuts save time
    net = _net()
    mac_only = rankslim.compress(net, macs=0.6, input_shape=SHAPE, speed_aware=False)
    t_mac_only = _fraction(mac_only.model, net)
    res = rankslim.compress(net, macs=0.6, latency=round(t_mac_only - 0.01, 3), input_shape=SHAPE)
    x = torch.zeros(1, *SHAPE)
    assert count_macs(res.model, x) <= 0.6 * count_macs(net, x)
    assert _fraction(res.model, net) < t_mac_only


def test_latency_and_macs_that_cannot_hold_together_are_refused(timed):
    with pytest.raises(BudgetError, match=r"latency 0\.9 and macs 0\.01 cannot both be met: .*MACs (\d\.\d{4})"):
        rankslim.compress(_net(), latency=0.9, macs=0.01, input_shape=SHAPE)


def test_a_measured_fraction_over_the_request_is_a_warning_note(timed, monkeypatch):
    # the whole compressed model is slower than its layers timed alone add up to (not additive): say so
    def slow_inside(module, x, runtime, threads, warmup, repeats):
        t = fake_time(module, x)
        inside = sum(1 for m in module.modules() if isinstance(m, (LowRankConv2d, LowRankLinear)))
        return t * 1.5 if isinstance(module, TinyNet) and inside else t
    monkeypatch.setattr(latency_cache, "_time_module", slow_inside)
    res = rankslim.compress(_net(), latency=0.6, input_shape=SHAPE)
    lat = res.report.metrics["latency"]
    assert lat["over"] is True and lat["measured"] > 0.6 * 1.05 and lat["predicted"] <= 0.6
    assert any(n.startswith("warning: the measured time fraction") for n in res.report.notes)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), True, "half"])
def test_bad_latency_values_are_refused(value):
    with pytest.raises(BudgetError, match=r"fraction in \(0, 1\]"):
        rankslim.compress(_net(), latency=value, input_shape=SHAPE)


@pytest.mark.parametrize("kw,needle", [
    ({"macs": 0.5, "params": 0.5}, "latency, macs and params cannot all be combined"),
    ({"ratio": 0.5}, "ratio fixes every rank"),
    ({"energy": 0.9}, "energy fixes every rank"),
    ({"ranks": 4}, "ranks fixes every rank"),
    ({"max_drop": 0.01}, "max_drop"),
    ({"speed_aware": False}, "speed_aware=False"),
    ({"speed_aware": {"margin": 0.1}}, "margin"),
    ({"speed_aware": {"mode": "auto", "max_seconds": 5}}, "max_seconds"),
    ({"allocator": "vbmf"}, "does not meet a budget"),
    ({"example_inputs": torch.zeros(1, *SHAPE)}, "example_inputs"),
])
def test_latency_refuses_what_it_cannot_combine_with(timed, kw, needle):
    with pytest.raises((OptionError, BudgetError), match=needle):
        rankslim.compress(_net(), latency=0.5, input_shape=SHAPE, **kw)
    assert not timed  # refused before anything was measured


def test_speed_aware_options_choose_what_is_timed(timed):
    res = rankslim.compress(_net(), latency=0.7, input_shape=SHAPE, speed_aware={"batch": 4, "threads": 1})
    mode = res.report.metrics["allocation_mode"]
    assert (mode["batch"], mode["threads"]) == (4, 1)
    assert res.report.metrics["latency"]["timed_on"]["batch"] == 4
    assert timed and {b for _, b in timed} == {4}  # layers and whole models alike
    assert _fraction(res.model, _net()) <= 0.7


def test_latency_with_real_timings_end_to_end(monkeypatch, tmp_path):
    # real timings: latency=1.0 holds whatever they say (dense layers are always allowed), so this cannot flake
    monkeypatch.setenv(latency_cache.CACHE_ENV, str(tmp_path / "latency"))
    net = _net()
    res = rankslim.compress(net, latency=1.0, input_shape=SHAPE)
    lat = res.report.metrics["latency"]
    assert lat["requested"] == 1.0 and lat["predicted"] <= 1.0 + 1e-9 and lat["measured"] > 0
    assert res.report.metrics["allocation_mode"]["mode"] == "latency budget"
    assert res.model(torch.zeros(1, *SHAPE)).shape == (1, 10)


# ------------------------------------------------------------------------------------------------ CLI


def _cli(tmp_path, *args: str):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", *args, "--out", str(out)])
    return r, out


def test_cli_latency_budget(timed, tmp_path):
    r, out = _cli(tmp_path, "--latency-budget", "0.6")
    assert r.exit_code == 0, r.output
    assert "allocation: latency budget (eager, batch 1" in r.output and "latency: measured" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["latency"]["requested"] == 0.6 and rep["metrics"]["latency"]["measured"] <= 0.6
    assert rep["budget"]["latency"] == 0.6
    model = rankslim.load(out / "model.rankslim", model=TinyNet())
    assert _fraction(model, _net()) <= 0.6


def test_cli_latency_budget_with_params_and_latency_measurement(timed, tmp_path):
    r, out = _cli(tmp_path, "--latency-budget", "0.8", "--params", "0.4", "--latency")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    lat = rep["metrics"]["latency"]
    assert lat["requested"] == 0.8 and lat["rows"]  # the budget's fractions and --latency's comparison together
    assert "## Latency (measured)" in (out / "report.md").read_text()
    model = rankslim.load(out / "model.rankslim", model=TinyNet())
    assert count_params(model) <= 0.4 * count_params(_net())


@pytest.mark.parametrize("args,needle", [
    (["--latency-budget", "0"], "fraction in (0, 1]"),
    (["--latency-budget", "-1"], "fraction in (0, 1]"),
    (["--latency-budget", "1.5"], "fraction in (0, 1]"),
    (["--latency-budget", "abc"], "--latency-budget takes a fraction"),
    (["--latency-budget", "nan"], "fraction in (0, 1]"),
    (["--latency-budget", "0.5", "--macs", "0.5", "--params", "0.5"], "latency, macs and params"),
    (["--latency-budget", "0.9", "--macs", "0.01"], "cannot both be met"),
    (["--latency-budget", "0.5", "--ratio", "0.5"], "ratio fixes"),
    (["--latency-budget", "0.5", "--mac-only"], "--mac-only"),
    (["--latency-budget", "0.5", "--speed-max-seconds", "3"], "--speed-max-seconds"),
    (["--latency-budget", "0.01"], "smallest time fraction"),
])
def test_cli_bad_latency_budgets_are_one_line_exit_2(timed, tmp_path, args, needle):
    r, out = _cli(tmp_path, *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output and needle in lines[0], r.output
    assert not out.exists()


def test_layers_timed_alone_above_the_whole_model_count_the_rest_as_zero(timed, monkeypatch):
    def fused(module, x, runtime, threads, warmup, repeats):  # the whole model runs faster than its parts alone
        return fake_time(module, x) * (0.5 if isinstance(module, TinyNet) else 1.0)
    monkeypatch.setattr(latency_cache, "_time_module", fused)
    res = rankslim.compress(_net(), latency=0.7, input_shape=SHAPE)
    cost_model = res.report.metrics["latency"]["cost_model"]
    assert cost_model["rest_ms"] == 0 and cost_model["targets_dense_ms"] > cost_model["original_ms"]
    assert any("counted as 0 ms" in n for n in res.report.notes)
    assert res.report.metrics["latency"]["predicted"] <= 0.7


def test_inplace_reuses_the_cost_models_measurement_of_the_original(timed):
    net, ref = _net(), _net()
    res = rankslim.compress(net, latency=0.6, input_shape=SHAPE, inplace=True)
    assert res.model is net
    lat = res.report.metrics["latency"]
    assert lat["original_ms"] == lat["cost_model"]["original_ms"]
    assert lat["measured"] == pytest.approx(_fraction(net, ref), rel=1e-9) and lat["measured"] <= 0.6


def test_cli_latency_budget_with_macs(timed, tmp_path):
    r, out = _cli(tmp_path, "--latency-budget", "0.8", "--macs", "0.7")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget"]["latency"] == 0.8 and rep["budget"]["macs"] == 0.7
    model = rankslim.load(out / "model.rankslim", model=TinyNet())
    x = torch.zeros(1, *SHAPE)
    assert count_macs(model, x) <= 0.7 * count_macs(_net(), x) and _fraction(model, _net()) <= 0.8
