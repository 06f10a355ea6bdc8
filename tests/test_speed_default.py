"""speed_aware="auto" (the default): speed-aware allocation for MAC budgets when measuring is cheap, MAC-only
otherwise, a fallback when the speed-aware budget is infeasible, and the report / CLI saying which was used.

The suite runs with RANKSLIM_SPEED_AWARE=off (tests/conftest.py); these tests unset it.  Timings are fabricated
where an outcome depends on them (``latency_cache._time_module`` patched), so nothing here depends on how busy
the machine is; MACs are counted independently by tests/_measure.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import rankslim
from rankslim import latency_cache
from rankslim.cli import app
from rankslim.errors import BudgetError, OptionError
from rankslim.speed_mode import SPEED_ENV, estimate_measuring, speed_request
from tests._measure import count_macs
from tests.conftest import TinyNet

SHAPE = (1, 8, 8)
TINY = "tests.conftest:TinyNet"
runner = CliRunner()


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """Auto mode as a user gets it (the suite's "off" removed) with an empty latency cache of this test."""
    monkeypatch.delenv(SPEED_ENV, raising=False)
    cache = tmp_path / "latency"
    monkeypatch.setenv(latency_cache.CACHE_ENV, str(cache))
    return cache


def _fake_timer(monkeypatch, factorized_faster: bool = True) -> list[nn.Module]:
    """Replace the timing of one layer form by its parameter count (ms): factorized forms at low rank are then
    "faster" than dense, deterministically; with ``factorized_faster=False`` every factorized form is slower.
    Returns the list of timed modules."""
    timed: list[nn.Module] = []

    def fake(module, x, runtime, threads, warmup, repeats):
        timed.append(module)
        n = float(sum(p.numel() for p in module.parameters()))
        dense = type(module) in (nn.Conv2d, nn.Linear)
        return n if dense or factorized_faster else 1e9 + n
    monkeypatch.setattr(latency_cache, "_time_module", fake)
    return timed


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def _cache_files(cache) -> list:
    return sorted(cache.glob("*.json")) if cache.exists() else []


# --------------------------------------------------------------------------------------- (a) speed-aware


def test_auto_with_a_macs_budget_is_speed_aware_and_meets_the_budget(auto, monkeypatch):
    timed = _fake_timer(monkeypatch)
    net = _net()
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE)
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "speed-aware" and mode["requested"] == "auto"
    assert (mode["runtime"], mode["batch"], mode["threads"]) == ("eager", 1, 1)
    assert mode["to_measure"] > 0 and mode["cached"] == 0 and mode["estimated_s"] < 20
    x = torch.zeros(1, *SHAPE)
    assert count_macs(res.model, x) <= 0.5 * count_macs(net, x)
    assert any(not isinstance(m, (nn.Conv2d, nn.Linear)) for m in (res.model.conv2, res.model.fc1))
    # every target's timings went to the latency cache: one file per layer
    targets = [r.name for r in res.report.rows]
    assert len(_cache_files(auto)) == len(targets) and timed
    assert "allocation: speed-aware (eager, batch 1, 1 thread(s)" in res.report.to_markdown()
    assert "speed_aware" in res.report.metrics  # the measurements, for report.json


def test_auto_measures_when_everything_is_cached_whatever_the_estimate(auto, monkeypatch):
    _fake_timer(monkeypatch)
    rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware=True)  # fills the cache
    timed = _fake_timer(monkeypatch)
    res = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware={"mode": "auto", "max_seconds": 0})
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "speed-aware" and mode["to_measure"] == 0 and mode["estimated_s"] == 0
    assert not timed  # nothing was measured again
    assert "all timings cached" in res.report.to_markdown()


def test_auto_with_real_timings_runs_end_to_end(auto):
    # real timings (no fake): with macs=1.0 the budget holds whatever they say, so the outcome is not timing-bound
    net = _net()
    res = rankslim.compress(net, macs=1.0, input_shape=SHAPE)
    assert res.report.metrics["allocation_mode"]["mode"] == "speed-aware"
    x = torch.zeros(1, *SHAPE)
    assert count_macs(res.model, x) <= count_macs(net, x)
    assert len(_cache_files(auto)) == len(res.report.rows)


# --------------------------------------------------------------------------------------- (b) no MAC budget


@pytest.mark.parametrize("kw,why", [({"params": 0.5}, "params-only budget"), ({"ratio": 0.5}, "ratio fixes"),
                                    ({"energy": 0.9}, "energy fixes"), ({"ranks": 4}, "ranks fixes")])
def test_auto_without_a_macs_budget_is_mac_only_with_the_reason(auto, monkeypatch, kw, why):
    timed = _fake_timer(monkeypatch)
    res = rankslim.compress(_net(), input_shape=SHAPE, **kw)
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "mac-only" and mode["reason"].startswith("no MAC budget") and why in mode["reason"]
    assert not timed and not _cache_files(auto)
    assert "allocation: mac-only (no MAC budget" in res.report.to_markdown()
    assert "speed_aware" not in res.report.metrics


def test_max_drop_search_says_mac_only(auto):
    from rankslim.data import load_dataset
    from torch.utils.data import Subset
    train = load_dataset("digits", "train")
    res = rankslim.compress(_net(), max_drop=0.9, data=Subset(train, range(200)),
                            eval_data=Subset(train, range(200, 300)), input_shape=SHAPE, macs=1.0)
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "mac-only" and mode["reason"].startswith("max_drop search")
    assert not _cache_files(auto)
    with pytest.raises(OptionError, match="max_drop"):
        rankslim.compress(_net(), max_drop=0.9, data=Subset(train, range(200)), input_shape=SHAPE,
                          speed_aware=True)


# --------------------------------------------------------------------------------------- (c) too costly


def test_auto_skips_measuring_estimated_above_the_threshold(auto, monkeypatch):
    def never(*a, **k):
        raise AssertionError("auto mode measured although the estimate was over the threshold")
    monkeypatch.setattr(latency_cache, "_time_module", never)
    res = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware={"mode": "auto", "max_seconds": 1e-6})
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "mac-only"
    assert mode["reason"].startswith("measuring estimated at ") and "> 1e-06 s" in mode["reason"]
    assert not _cache_files(auto)  # nothing measured, nothing cached
    x = torch.zeros(1, *SHAPE)
    assert count_macs(res.model, x) <= 0.5 * count_macs(_net(), x)


def test_estimate_grows_with_batch_and_counts_cached_forms(auto, monkeypatch):
    from rankslim import pipeline
    sel = pipeline.select(_net(), SHAPE, "svd")
    table = pipeline.cost_table(sel, None, quantities=("macs",))
    one, big = estimate_measuring(sel, table, batch=1), estimate_measuring(sel, table, batch=4096)
    assert 0 < one.seconds < big.seconds and one.to_measure == big.to_measure > 0 and one.cached == 0
    _fake_timer(monkeypatch)
    pipeline.speed_aware(sel, table)  # fills the cache at batch 1
    again = estimate_measuring(sel, table, batch=1)
    assert (again.seconds, again.to_measure, again.cached) == (0.0, 0, one.to_measure)
    # another batch is another cache key: still to measure
    assert estimate_measuring(sel, table, batch=4096).to_measure == big.to_measure


# ------------------------------------------------------------------------------------------ (d) infeasible


def test_infeasible_speed_aware_budget_falls_back_under_auto_and_raises_when_forced(auto, monkeypatch):
    _fake_timer(monkeypatch, factorized_faster=False)
    net = _net()
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE)
    mode = res.report.metrics["allocation_mode"]
    assert mode["mode"] == "mac-only" and mode["reason"].startswith("speed-aware budget infeasible")
    x = torch.zeros(1, *SHAPE)
    assert count_macs(res.model, x) <= 0.5 * count_macs(net, x)  # the MAC-only allocation met the budget
    assert "speed_aware" not in res.report.metrics
    with pytest.raises(BudgetError, match="Speed-aware: .* no faster .*--mac-only"):
        rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=True)


def test_a_measuring_failure_under_auto_falls_back(auto, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(latency_cache, "_time_module", broken)
    res = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE)
    assert res.report.metrics["allocation_mode"]["reason"] == "measuring failed (RuntimeError: no such kernel)"
    with pytest.raises(RuntimeError, match="no such kernel"):
        rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware=True)


# ------------------------------------------------------------------------------ switches and environment


def test_environment_overrides_auto_only(auto, monkeypatch):
    timed = _fake_timer(monkeypatch)
    monkeypatch.setenv(SPEED_ENV, "off")
    mode = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE).report.metrics["allocation_mode"]
    assert mode == {"mode": "mac-only", "reason": f"turned off ({SPEED_ENV}=off)", "requested": "off",
                    "source": f"{SPEED_ENV}=off"}
    assert not timed
    # explicit True is not overridden by "off"
    mode = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware=True).report.metrics["allocation_mode"]
    assert mode["mode"] == "speed-aware" and mode["source"] == "speed_aware=True"
    monkeypatch.setenv(SPEED_ENV, "on")
    # "on" measures whatever the estimate, even for a params budget ...
    mode = rankslim.compress(_net(), params=0.5, input_shape=SHAPE,
                             speed_aware={"mode": "auto", "max_seconds": 0}).report.metrics["allocation_mode"]
    assert mode["mode"] == "speed-aware" and mode["requested"] == "on"
    # ... and explicit False is not overridden by it
    mode = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware=False).report.metrics["allocation_mode"]
    assert mode["reason"] == "turned off (speed_aware=False)"
    monkeypatch.setenv(SPEED_ENV, "sometimes")
    with pytest.raises(OptionError, match=SPEED_ENV):
        rankslim.compress(_net(), macs=0.5, input_shape=SHAPE)


@pytest.mark.parametrize("value,match", [("maybe", "mode"), ({"batchsize": 2}, "speed_aware takes"),
                                         ({"batch": 0}, "positive integer"), ({"margin": 1.5}, "margin"),
                                         ({"runtime": "tvm"}, "runtime"), ({"max_seconds": 5}, "auto mode"),
                                         ({"mode": "auto", "max_seconds": -1}, "max_seconds"), (3, "True, False")])
def test_bad_speed_aware_values_are_refused(value, match):
    with pytest.raises(OptionError, match=match):
        speed_request(value)


def test_forced_speed_aware_with_explicit_ranks_is_refused():
    with pytest.raises(OptionError, match="ranks"):
        rankslim.compress(_net(), ranks=4, input_shape=SHAPE, speed_aware=True)


def test_float64_layers_stay_mac_only_under_auto(auto, monkeypatch):
    timed = _fake_timer(monkeypatch)
    res = rankslim.compress(_net().double(), macs=0.5, input_shape=SHAPE)
    reason = res.report.metrics["allocation_mode"]["reason"]
    assert "float64" in reason and "float32 on the CPU" in reason and not timed


# ------------------------------------------------------------------------------------------------ (e) CLI


def _cli(tmp_path, *args: str):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", *args, "--out", str(out)])
    return r, out


def test_cli_default_is_auto_and_the_summary_says_which_allocation(auto, monkeypatch, tmp_path):
    _fake_timer(monkeypatch)
    r, out = _cli(tmp_path, "--macs", "0.5")
    assert r.exit_code == 0, r.output
    assert "allocation: speed-aware (eager, batch 1" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["allocation_mode"]["mode"] == "speed-aware"
    assert "allocation: speed-aware" in (out / "report.md").read_text()
    assert "measured_ms" not in r.output  # the raw timings stay in report.json


@pytest.mark.parametrize("flag", ["--mac-only", "--no-speed-aware"])
def test_cli_mac_only_turns_it_off(auto, monkeypatch, tmp_path, flag):
    timed = _fake_timer(monkeypatch)
    r, out = _cli(tmp_path, "--macs", "0.5", flag)
    assert r.exit_code == 0, r.output
    assert "allocation: mac-only (turned off (speed_aware=False))" in r.output and not timed
    assert "allocation: mac-only" in (out / "report.md").read_text()


def test_cli_flags_reach_the_api(auto, monkeypatch, tmp_path):
    import rankslim.api as api
    seen = []
    real = api.compress

    def spy(*a, **k):
        seen.append(k["speed_aware"])
        return real(*a, **k)
    monkeypatch.setattr(api, "compress", spy)
    _fake_timer(monkeypatch)
    for args in ([], ["--speed-aware"], ["--speed-aware", "--speed-batch", "2"], ["--mac-only"],
                 ["--speed-batch", "2"], ["--speed-aware", "--no-speed-check"],
                 ["--speed-aware", "--speed-runtime", "eager-cl"], ["--speed-max-seconds", "0"]):
        r, _ = _cli(tmp_path, "--macs", "0.5", *args)
        assert r.exit_code == 0, r.output
        if "eager-cl" in args:
            assert "allocation: speed-aware (eager-cl" in r.output
    assert seen == ["auto", True, {"batch": 2}, False, {"mode": "auto", "batch": 2}, {"check": False},
                    {"runtime": "eager-cl"}, {"mode": "auto", "max_seconds": 0.0}]
    # the threshold reaches auto mode: 0 s is too little for the measuring TinyNet needs ... unless cached
    assert "allocation: speed-aware" in r.output and "all timings cached" in r.output


def test_cli_params_budget_says_no_mac_budget(auto, tmp_path):
    r, _ = _cli(tmp_path, "--params", "0.5")
    assert r.exit_code == 0, r.output
    assert "allocation: mac-only (no MAC budget (params-only budget))" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--speed-aware", "--mac-only"], "contradict"),
    (["--speed-aware", "--no-speed-aware"], "contradict"),
    (["--mac-only", "--speed-batch", "4"], "--speed-batch"),
    (["--mac-only", "--speed-max-seconds", "5"], "--speed-max-seconds"),
    (["--mac-only", "--no-speed-check"], "whole-model check"),
    (["--speed-aware", "--speed-max-seconds", "5"], "threshold of auto mode"),
    (["--speed-aware", "--ranks", "4"], "ranks"),
    (["--speed-batch", "0"], "positive integer"),
    (["--speed-runtime", "tensorrt"], "runtime must be one of eager, eager-cl, onnxruntime"),
    (["--mac-only", "--speed-runtime", "eager-cl"], "--speed-runtime"),
])
def test_cli_bad_combinations_are_one_line_exit_2(auto, tmp_path, args, needle):
    r, out = _cli(tmp_path, *(["--macs", "0.5"] if "--ranks" not in args else []), *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output and needle in lines[0], r.output
    assert not out.exists()
