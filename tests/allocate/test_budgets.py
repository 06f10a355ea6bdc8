"""Every registered allocator meets both budgets on the compressed model (measured on the built module), or refuses
with the reason."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import rankslim
from rankslim.errors import BudgetError

from .._measure import count_macs, count_params

SHAPE = (1, 8, 8)
OPTIONS = {"cobla": {"maxiter": 6}, "bayes": {"trials": 6}, "greedy-sensitivity": {"candidates": (0.25, 0.5)}}
BUDGETED = ["cptv", "pos-greedy", "pos-cvx", "cobla", "bayes", "greedy-sensitivity"]


def _data():
    return TensorDataset(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)))


def _compress(model, alloc, method="svd", **kw):
    methods = {"conv3": "svd", "fc*": "svd"} if method == "spatial" else None
    return rankslim.compress(model, method, methods=methods, allocator=alloc, data=_data(), calib_samples=64,
                             input_shape=SHAPE, allocator_options=OPTIONS.get(alloc), **kw)


def _check(res, original, params, macs):
    """The built model, measured independently of rankslim's cost model, is within the budgets and runs."""
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    if params is not None:
        assert count_params(res.model) <= params * count_params(original)
    if macs is not None:
        assert count_macs(res.model, x) <= macs * count_macs(original, x)
    with torch.no_grad():
        assert bool(torch.isfinite(res.model(x)).all())


def test_all_allocators_registered():
    for name in BUDGETED + ["vbmf", "gavish-donoho"]:
        assert name in rankslim.ALLOCATORS


@pytest.mark.parametrize("alloc", BUDGETED)
@pytest.mark.parametrize("method", ["svd", "spatial"])
def test_budgeted_allocators_meet_both_budgets(tiny_net, alloc, method):
    for params, macs in ((0.5, 0.5), (0.35, None), (None, 0.4)):
        res = _compress(tiny_net, alloc, method, params=params, macs=macs)
        _check(res, tiny_net, params, macs)


@pytest.mark.parametrize("alloc", BUDGETED)
def test_impossible_budget_is_refused_with_reason(tiny_net, alloc):
    with pytest.raises(BudgetError, match="budget cannot be met"):
        _compress(tiny_net, alloc, params=0.02, macs=0.02)


@pytest.mark.parametrize("alloc", ["vbmf", "gavish-donoho"])
@pytest.mark.parametrize("method", ["svd", "spatial"])
def test_budget_free_rules_yield_or_refuse(tiny_net, alloc, method):
    res = _compress(tiny_net, alloc, method, params=1.0)  # accept what the rule yields
    _check(res, tiny_net, 1.0, None)
    x = torch.zeros(1, *SHAPE)
    p = count_params(res.model) / count_params(tiny_net)
    m = count_macs(res.model, x) / count_macs(tiny_net, x)
    assert p < 1.0  # the rule compressed something
    with pytest.raises(BudgetError, match="budget cannot be set|budget cannot be met"):
        _compress(tiny_net, alloc, method, params=0.9 * p, macs=0.9 * m)


def test_search_allocators_use_eval_fn(tiny_net):
    calls = []

    def eval_fn(model):
        calls.append(1)
        with torch.no_grad():
            return float(model(torch.ones(2, *SHAPE)).softmax(1)[:, 0].mean())

    for alloc in ("bayes", "greedy-sensitivity"):
        calls.clear()
        res = _compress(tiny_net, alloc, params=0.5, macs=0.5, eval_fn=eval_fn)
        _check(res, tiny_net, 0.5, 0.5)
        assert len(calls) >= 3


def test_seeded_allocators_are_reproducible(tiny_net):
    for alloc in ("cobla", "bayes"):
        a = _compress(tiny_net, alloc, params=0.5, macs=0.5, seed=3)
        b = _compress(tiny_net, alloc, params=0.5, macs=0.5, seed=3)
        assert [r.rank for r in a.report.rows] == [r.rank for r in b.report.rows]
