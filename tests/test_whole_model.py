"""The whole-model check of speed-aware allocation (rankslim.whole_model): the built model is timed against the
original; when it is not faster the margin is raised and the model allocated and built again.

Layer timings are fabricated (``latency_cache._time_module``: parameter counts) and so is the whole-model timing
(``whole_model.time_models``, patched per test), so every outcome here is decided by the test, not by the machine's
load; MACs are counted independently by tests/_measure.py.  One test runs the real timing function on tiny models
for its contract (alternation, modes restored, onnxruntime path), never for a speed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rankslim
from rankslim import latency_cache, whole_model
from rankslim.errors import BudgetError, OptionError
from rankslim.whole_model import ESCALATION, ROUNDS
from rankslim.whole_model import time_models as real_time_models  # before conftest's autouse patch
from tests._measure import count_macs
from tests.conftest import TinyNet

SHAPE = (1, 8, 8)


@pytest.fixture
def layers_timed(monkeypatch, tmp_path):
    """Layer forms timed by their parameter count: factorized forms at low rank are "faster" than dense."""
    monkeypatch.setenv(latency_cache.CACHE_ENV, str(tmp_path / "latency"))

    def fake(module, x, runtime, threads, warmup, repeats):
        return float(sum(p.numel() for p in module.parameters()))
    monkeypatch.setattr(latency_cache, "_time_module", fake)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def _whole(monkeypatch, speedups: list[float]) -> list[int]:
    """Whole-model timing: the i-th check measures the compressed model at ``speedups[i]`` (the last one repeats).
    Returns a list that collects how many models each call timed."""
    calls: list[int] = []

    def fake(models, example, **kw):
        calls.append(len(models))
        if len(models) == 1:  # inplace: the original alone, then the built model alone
            return [10.0 if len(calls) % 2 else 10.0 / speedups[0]], 9
        s = speedups[min(len(calls) - 1, len(speedups) - 1)]
        return [10.0, 10.0 / s], 9
    monkeypatch.setattr(whole_model, "time_models", fake)
    return calls


def _macs_ok(res, net, frac: float) -> bool:
    x = torch.zeros(1, *SHAPE)
    return count_macs(res.model, x) <= frac * count_macs(net, x)


def test_a_faster_model_is_kept_at_the_requested_margin(layers_timed, monkeypatch):
    calls = _whole(monkeypatch, [1.3])
    net = _net()
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=True)
    whole = res.report.metrics["whole_model"]
    assert calls == [2] and len(whole["tried"]) == 1
    assert whole["chosen"]["speedup"] == pytest.approx(1.3) and whole["chosen"]["faster"]
    assert whole["chosen"]["margin"] == pytest.approx(0.05)
    mode = res.report.metrics["allocation_mode"]
    assert mode["whole_model_speedup"] == pytest.approx(1.3)
    md = res.report.to_markdown()
    assert "whole model measured 1.30x" in md
    assert "'tried'" not in md  # the raw timings stay in report.json, the summary has the line
    assert _macs_ok(res, net, 0.5)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules() if m is not net and m.weight is not None
               if hasattr(m, "weight") and not isinstance(m, nn.BatchNorm2d))  # the user's model untouched


def test_a_slower_model_raises_the_margin_until_one_is_faster(layers_timed, monkeypatch):
    _whole(monkeypatch, [0.95, 1.1])
    net = _net()
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=True)
    whole = res.report.metrics["whole_model"]
    assert [t["margin"] for t in whole["tried"]] == pytest.approx([0.05, ESCALATION[0]])
    assert whole["chosen"]["margin"] == pytest.approx(ESCALATION[0]) and whole["chosen"]["speedup"] == pytest.approx(1.1)
    assert res.report.metrics["speed_aware"]["margin"] == pytest.approx(ESCALATION[0])
    assert _macs_ok(res, net, 0.5)  # the re-allocated model still meets the budget, measured independently
    assert any("margin 5%: 0.95x" in n and "kept margin 15%" in n for n in res.report.notes)


def test_never_faster_refuses_when_forced_and_warns_under_auto(layers_timed, monkeypatch):
    _whole(monkeypatch, [0.9, 0.97, 0.93])
    net = _net()
    with pytest.raises(BudgetError, match="no allocation that meets the budget was measured faster .* 0.97x"):
        rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=True)
    monkeypatch.delenv("RANKSLIM_SPEED_AWARE", raising=False)
    _whole(monkeypatch, [0.9, 0.97, 0.93])
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE)  # auto: the budget was asked for, not speed
    whole = res.report.metrics["whole_model"]
    assert res.report.metrics["allocation_mode"]["mode"] == "speed-aware"
    assert whole["chosen"]["speedup"] == pytest.approx(0.97)  # the fastest of those tried
    assert len(whole["tried"]) >= 2
    assert any(n.startswith("warning: whole model measured 0.97x") for n in res.report.notes)
    assert _macs_ok(res, net, 0.5)


def test_auto_falling_back_to_mac_only_still_times_the_model(layers_timed, monkeypatch):
    monkeypatch.delenv("RANKSLIM_SPEED_AWARE", raising=False)
    net = _net()
    calls = _whole(monkeypatch, [0.9])
    # measuring the layers is estimated above max_seconds=0: auto allocates by MACs, then times the model once
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware={"mode": "auto", "max_seconds": 0})
    mode, whole = res.report.metrics["allocation_mode"], res.report.metrics["whole_model"]
    assert mode["mode"] == "mac-only" and mode["whole_model_speedup"] == pytest.approx(0.9)
    assert calls == [2] and whole["chosen"]["margin"] is None  # once, no retries: the layers were never timed
    assert any(n.startswith("warning: whole model measured 0.90x") and "MAC-only" in n for n in res.report.notes)
    assert _macs_ok(res, net, 0.5)
    calls = _whole(monkeypatch, [1.3])
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware={"mode": "auto", "max_seconds": 0})
    assert calls == [2] and not any(n.startswith("warning: whole model") for n in res.report.notes)
    # a params budget and an explicit speed_aware=False are not timed
    calls = _whole(monkeypatch, [0.9])
    rankslim.compress(net, params=0.5, input_shape=SHAPE, speed_aware={"mode": "auto", "max_seconds": 0})
    rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=False)
    assert calls == []


def test_check_false_skips_it_and_bad_values_are_refused(layers_timed, monkeypatch):
    calls = _whole(monkeypatch, [0.5])
    res = rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware={"check": False})
    assert not calls and "whole_model" not in res.report.metrics
    with pytest.raises(OptionError, match="speed_aware check is True"):
        rankslim.compress(_net(), macs=0.5, input_shape=SHAPE, speed_aware={"check": "yes"})


def test_inplace_is_timed_before_and_after_without_retries(layers_timed, monkeypatch):
    calls = _whole(monkeypatch, [0.8])
    net = _net()
    res = rankslim.compress(net, macs=0.5, input_shape=SHAPE, speed_aware=True, inplace=True)
    assert res.model is net and calls == [1, 1]  # original alone before the build, the built model after
    assert len(res.report.metrics["whole_model"]["tried"]) == 1
    assert any("inplace=True: not re-allocated" in n for n in res.report.notes)


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_the_real_timing_alternates_both_models_and_restores_their_modes(runtime):
    a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
    b = nn.Sequential(nn.Linear(16, 4)).eval()
    seen: list[str] = []
    a.register_forward_pre_hook(lambda m, x: seen.append("a"))
    b.register_forward_pre_hook(lambda m, x: seen.append("b"))
    times, calls = real_time_models([a, b], torch.randn(1, 16), runtime=runtime, batch=4, check_seconds=0)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert calls == ROUNDS * whole_model.MIN_REPEATS  # no time to spend: the minimum
    assert a.training and not b.training
    if runtime == "eager":  # warm-up a, b; first guess a, b; then ROUNDS rounds of a's calls then b's
        reps = whole_model.MIN_REPEATS
        assert seen == ["a", "b", "a", "b"] + (["a"] * reps + ["b"] * reps) * ROUNDS
