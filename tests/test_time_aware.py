"""The time-aware step of speed-aware allocation (rankslim.allocate.timed): the fastest allocation, by measured
layer times, that meets the budget with no larger error proxy than the allocator's.

The pure function is checked against brute-force enumeration of every allocation of a small table (errors computed
here from the spectra); through compress() the timings are fabricated (tests/test_latency_budget.py's rule: MACs
counted by tests/_measure.py plus a per-call overhead), and MACs of the built models are counted independently.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rankslim
from rankslim.allocate import Budget, CostTable, LayerOption, get_allocator
from rankslim.allocate.timed import fastest_within_error
from rankslim.cli import app
from rankslim.cost import Cost
from rankslim.errors import OptionError
from tests._measure import count_macs
from tests.test_latency_budget import SHAPE, TINY, _net, fake_time, timed  # noqa: F401  (timed: a fixture)

runner = CliRunner()


def _table() -> tuple[CostTable, dict]:
    """Three layers of rank 6 whose factorized time is NOT proportional to MACs (rank 4 slower than rank 6 in
    layer b; layer c cheap in MACs but slow until rank 2)."""
    spectra = {"a": [5, 4, 3, 2, 1, 1], "b": [9, 3, 2, 1, 1, 0.5], "c": [4, 4, 4, 1, 1, 1]}
    dense_macs = {"a": 120, "b": 120, "c": 60}
    times = {"a": {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0},
             "b": {1: 1.0, 2: 1.5, 3: 2.0, 4: 7.0, 5: 3.0, 6: 3.5},
             "c": {1: 4.0, 2: 0.5, 3: 0.8, 4: 1.0, 5: 1.2, 6: 1.4}}
    dense_ms = {"a": 6.5, "b": 8.0, "c": 3.0}
    layers = [LayerOption(n, 6, Cost(dense_macs[n], dense_macs[n]),
                          (lambda r, n=n: Cost(dense_macs[n] * r // 8, dense_macs[n] * r // 8)),
                          torch.tensor(spectra[n], dtype=torch.float64)) for n in "abc"]
    table = CostTable(layers, Cost(400, 400), quantities=("macs",))
    return table, {n: {"dense": dense_ms[n], "ranks": times[n]} for n in "abc"}


def _error(sigma: list[float], r) -> float:
    s2 = np.square(np.asarray(sigma, dtype=float))
    return 0.0 if r is None else 1.0 - s2[:r].sum() / s2.sum()


@pytest.mark.parametrize("fill", [True, False])
@pytest.mark.parametrize("frac,slack", [(0.6, 0.0), (0.5, 0.0), (0.5, 0.3), (0.7, 0.0), (0.75, 0.0)])
def test_fastest_within_error_is_the_brute_force_optimum(frac, slack, fill):
    table, timings = _table()
    budget = Budget(macs=frac)
    ref = get_allocator("cptv")(table, budget)
    got = fastest_within_error(table, ref, timings, budget, slack=slack, fill=fill)
    lo = table.by_name()
    spectra = {n: lo[n].sigma.tolist() for n in lo}

    def ms(n, r):
        return timings[n]["dense"] if r is None else timings[n]["ranks"][r]

    def macs(n, r):
        return lo[n].dense.macs if r is None else lo[n].cost_fn(r).macs
    cap = (1 + slack) * sum(_error(spectra[n], ref[n]) for n in lo) + 1e-9
    limit = frac * 400 - table.fixed.macs
    # the floor: the budget less 1% of the original's MACs, or the reference's MACs when lower
    floor = min(sum(macs(n, ref[n]) for n in lo), limit - 0.01 * 400) if fill else -np.inf
    best = None
    for combo in itertools.product(*[[None, *range(1, 7)] for _ in lo]):
        pick = dict(zip(lo, combo))
        if not floor - 1e-9 <= sum(macs(n, r) for n, r in pick.items()) <= limit:
            continue
        if sum(_error(spectra[n], r) for n, r in pick.items()) > cap:
            continue
        t = sum(ms(n, r) for n, r in pick.items())
        best = t if best is None else min(best, t)
    got_ms = sum(ms(n, got[n]) for n in lo)
    ref_ms = sum(ms(n, ref[n]) for n in lo)
    assert best is not None and got_ms == pytest.approx(best)
    assert got_ms <= ref_ms
    assert floor - 1e-9 <= sum(macs(n, got[n]) for n in lo) <= limit
    assert sum(_error(spectra[n], got[n]) for n in lo) <= cap
    assert got.info["predicted_ms"] == pytest.approx(got_ms)


def test_the_reference_is_kept_when_nothing_is_faster():
    table, timings = _table()
    flat = {n: {"dense": 1.0, "ranks": {r: 1.0 for r in range(1, 7)}} for n in timings}  # every option alike
    ref = get_allocator("cptv")(table, Budget(macs=0.6))
    got = fastest_within_error(table, ref, flat, Budget(macs=0.6))
    assert dict(got) == dict(ref) and got.info["time_aware"] == "kept"


def test_a_predicted_gain_below_min_gain_keeps_the_reference():
    table, timings = _table()
    ref = get_allocator("cptv")(table, Budget(macs=0.7))
    free = fastest_within_error(table, ref, timings, Budget(macs=0.7))
    gain = 1 - free.info["predicted_ms"] / free.info["reference_ms"]
    assert gain > 0.05 and dict(free) != dict(ref)
    kept = fastest_within_error(table, ref, timings, Budget(macs=0.7), min_gain=gain + 0.01)
    assert dict(kept) == dict(ref) and kept.info["time_aware"] == "kept"
    assert kept.info["solution_ms"] == pytest.approx(free.info["predicted_ms"])


def _speed_compress(**speed):
    return rankslim.compress(_net(), "svd", macs=0.6, input_shape=SHAPE, speed_aware={"check": False, **speed})


def test_compress_time_aware_is_no_slower_and_meets_the_budget(timed):  # noqa: F811
    on, off = _speed_compress(), _speed_compress(time_aware=False)
    x = torch.zeros(1, *SHAPE)
    orig_macs = count_macs(_net(), x)
    for res in (on, off):
        assert count_macs(res.model, x) <= 0.6 * orig_macs
    # the fabricated rule makes the allocator's spread of ranks slow: the step must move ranks and be faster
    assert fake_time(on.model, x) < fake_time(off.model, x)
    ta = on.report.metrics["allocation_mode"]["time_aware"]
    assert ta["time_aware"] == "fastest within error" and ta["changed_layers"] >= 1
    assert ta["predicted_ms"] <= ta["reference_ms"] and ta["error"] <= ta["reference_error"] + 1e-9
    assert off.report.metrics["allocation_mode"]["time_aware"] == {"time_aware": "off"}
    assert "time-aware" in rankslim.speed_mode.describe(on.report.metrics["allocation_mode"])


@pytest.mark.parametrize("speed", [{"error_slack": -0.1}, {"error_slack": True}, {"time_aware": "yes"},
                                   {"time_aware": False, "error_slack": 0.2}])
def test_bad_time_aware_options_are_refused(speed):
    with pytest.raises(OptionError):
        rankslim.compress(_net(), "svd", macs=0.6, input_shape=SHAPE, speed_aware=speed)


def test_latency_budget_refuses_time_aware_options():
    with pytest.raises(OptionError, match="time_aware"):
        rankslim.compress(_net(), "svd", latency=0.8, input_shape=SHAPE, speed_aware={"time_aware": False})


@pytest.mark.parametrize("flags", [["--mac-only", "--no-time-aware"], ["--mac-only", "--speed-error-slack", "0.1"]])
def test_cli_refuses_time_aware_flags_with_mac_only(flags, tmp_path):
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--macs", "0.6", *flags,
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "--mac-only" in r.output and len(r.output.strip().splitlines()) == 1
