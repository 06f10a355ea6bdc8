"""Bayes (LRPET eq. 11 with Optuna) and greedy-sensitivity specifics."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from rankslim import pipeline
from rankslim.allocate import Budget, get_allocator


def _run(model, alloc, **opts):
    """The allocation stage on its own (select -> calibrate -> cost table -> allocate), as compress runs it."""
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    budget = Budget(params=0.45, macs=0.45)
    sel = pipeline.select(model, (1, 8, 8), "svd")
    cal = pipeline.calibrate(sel, data, calib_samples=64, want_batches=True)
    table = pipeline.cost_table(sel, cal, quantities=budget.quantities)
    a = pipeline.allocate(sel, table, get_allocator(alloc, opts), budget, calibration=cal)
    return {"a": a, "table": table, "budget": budget}


def test_bayes_never_worse_than_uniform_start(tiny_net):
    box = _run(tiny_net, "bayes", trials=8)
    info = box["a"].info
    assert info["trials"] == 8 and info["objective"] <= info["uniform_objective"] + 1e-12
    assert abs(info["objective"] - (info["error"] + info["size"])) < 1e-9  # lambda = 1


def test_greedy_sensitivity_picks_smallest_fitting_tolerance(tiny_net):
    box = _run(tiny_net, "greedy-sensitivity", candidates=(0.25, 0.5, 0.75))
    a, table, budget = box["a"], box["table"], box["budget"]
    sens = a.info["sensitivity"]
    assert set(sens) == {lo.name for lo in table.layers}
    assert table.fits(a, budget)
    if not a.info["projected"]:
        tau = a.info["tolerance"]
        lower = sorted({d for row in sens.values() for d in row.values() if d < tau})
        for t in lower:  # any smaller tolerance gives an allocation that breaks the budget
            ranks = {}
            for lo in table.layers:
                ok = [table.decide(lo, int(-(-float(c) * lo.max_rank // 1))) for c, d in sens[lo.name].items() if d <= t]
                ok = [r for r in ok if r is not None]
                ranks[lo.name] = min(ok) if ok else None
            assert not table.fits(ranks, budget)
