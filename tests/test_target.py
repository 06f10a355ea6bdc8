"""Accuracy targets (``compress(max_drop=...)``): the returned model is within the drop on held-out training data,
the search log is sensible, nonsense is refused with one error, and the stages run once."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import rankslim
from rankslim import pipeline
from rankslim.data import load_dataset
from rankslim.errors import BudgetError, DataError, OptionError
from rankslim.target import parse_drop
from tests.conftest import TinyNet, train_on_digits


@pytest.fixture(scope="module")
def trained() -> TinyNet:
    torch.manual_seed(0)
    return train_on_digits(TinyNet(), 12)


def _held_out_accuracy(model, ds) -> float:
    # measured here independently of rankslim's evaluation helpers
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("drop", [0.02, 0.10])
def test_max_drop_model_within_drop_on_held_out_data(trained, drop):
    train = load_dataset("digits", "train")
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    fit_part, held = Subset(train, perm[: n - 300]), Subset(train, perm[n - 300:])
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = rankslim.compress(trained, "svd", max_drop=drop, data=fit_part, eval_data=held, input_shape=(1, 8, 8),
                            keep_head=False)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    base, got = _held_out_accuracy(trained, held), _held_out_accuracy(res.model, held)
    assert base - got <= drop + 1e-9
    log = res.report.metrics["max_drop_search"]
    assert len(log) >= 3 and log[0]["budget"] == 1.0
    chosen = res.report.metrics["max_drop"]["chosen_budget"]
    # the returned model has the chosen budget's size, counted on the built module
    assert _params(res.model) <= chosen * _params(trained) + 1
    assert _params(res.model) < _params(trained)  # something was compressed
    # the log is sensible: every passing candidate is at least the chosen budget, every failing one below it
    for e in log:
        assert e["within"] == (e["drop"] <= drop + 1e-12)
        assert (e["budget"] >= chosen) if e["within"] else (e["budget"] < chosen)
    assert any(e["budget"] == chosen and e["within"] for e in log)
    # the drop it logs for the chosen budget is the one measured here
    assert next(e for e in log if e["budget"] == chosen)["accuracy"] == pytest.approx(got, abs=1e-6)


def test_larger_drop_allows_a_smaller_model(trained):
    kw = dict(data="digits", input_shape=(1, 8, 8), keep_head=False)
    tight = rankslim.compress(trained, "svd", max_drop=0.0, **kw)
    loose = rankslim.compress(trained, "svd", max_drop=0.5, **kw)
    assert _params(loose.model) < _params(tight.model)


def test_max_drop_searches_macs_when_named(trained):
    from torch.utils.flop_counter import FlopCounterMode
    res = rankslim.compress(trained, "svd", max_drop="5%", macs=0.9, data="digits", input_shape=(1, 8, 8),
                            keep_head=False)
    info = res.report.metrics["max_drop"]
    assert info["quantity"] == "macs" and info["upper"] == 0.9
    assert all(e["budget"] <= 0.9 for e in res.report.metrics["max_drop_search"])

    def macs(m):
        with FlopCounterMode(display=False) as fc:
            m.eval()(torch.zeros(1, 1, 8, 8))
        return fc.get_total_flops() / 2
    assert macs(res.model) <= info["chosen_budget"] * macs(trained) + 1


def test_stages_before_allocation_run_once(trained, monkeypatch):
    calls = {"select": 0, "calibrate": 0, "cost_table": 0, "allocate": 0}
    import rankslim.target as target
    for name in calls:
        orig = getattr(pipeline, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(target, name, wrapped)
    res = rankslim.compress(trained, "svd", max_drop=0.05, data="digits", input_shape=(1, 8, 8), keep_head=False)
    n = len(res.report.metrics["max_drop_search"])
    assert calls["select"] == calls["calibrate"] == calls["cost_table"] == 1
    assert calls["allocate"] == n >= 3


@pytest.mark.parametrize("bad", [-0.01, 1.0, 1.5, "150%", "-1%", float("nan"), "lots", True])
def test_nonsense_max_drop_refused(trained, bad):
    with pytest.raises(BudgetError, match="max_drop"):
        rankslim.compress(trained, "svd", max_drop=bad, data="digits", input_shape=(1, 8, 8))


def test_parse_drop_percent():
    assert parse_drop("1%") == pytest.approx(0.01)
    assert parse_drop("0.02") == pytest.approx(0.02)
    assert parse_drop(0) == 0.0


def test_max_drop_conflicts_and_missing_data(trained):
    with pytest.raises(OptionError, match="ratio"):
        rankslim.compress(trained, "svd", max_drop=0.01, ratio=0.5, data="digits", input_shape=(1, 8, 8))
    with pytest.raises(BudgetError, match="ONE budget"):
        rankslim.compress(trained, "svd", max_drop=0.01, params=0.5, macs=0.5, data="digits", input_shape=(1, 8, 8))
    with pytest.raises(DataError, match="labelled"):
        rankslim.compress(trained, "svd", max_drop=0.01, input_shape=(1, 8, 8))
    with pytest.raises(DataError, match="test split"):
        rankslim.compress(trained, "svd", max_drop=0.01, data="digits", eval_data="digits", input_shape=(1, 8, 8))
    unlabelled = TensorDataset(torch.zeros(20, 1, 8, 8))
    with pytest.raises(DataError, match=r"\(input, label\)"):
        rankslim.compress(trained, "svd", max_drop=0.01, data="digits", eval_data=unlabelled, input_shape=(1, 8, 8))
    with pytest.raises(OptionError, match="max_drop"):
        rankslim.compress(trained, "svd", params=0.5, eval_data=unlabelled, input_shape=(1, 8, 8))


def test_unreachable_drop_says_what_was_tried(trained):
    # at a ceiling of 10 % of the parameters this model loses far more than nothing: one clear error
    with pytest.raises(BudgetError, match="budget of 0.1 loses"):
        rankslim.compress(trained, "svd", max_drop=0.0, params=0.1, data="digits", input_shape=(1, 8, 8),
                          keep_head=False)
    with pytest.raises(BudgetError, match="below the smallest model possible"):
        rankslim.compress(trained, "svd", max_drop=0.01, params=0.001, data="digits", input_shape=(1, 8, 8),
                          keep_head=False)
