"""The latency cache is keyed by everything a timing depends on and invalidated when any part changes;
speed-aware cost tables use the measured times (fabricated here: no real timing is asserted)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rankslim import latency_cache as lc
from rankslim.allocate import Budget
from rankslim.latency_cache import LatencyCache, LatencyKey, layer_geometry


def _key(**over):
    base = dict(geometry=layer_geometry(nn.Conv2d(16, 32, 3, padding=1), (16, 8, 8)), method="svd", runtime="eager",
                dtype="float32", batch=1, threads=1,
                machine={"cpu": "AMD EPYC 7B13", "cores": 2, "arch": "x86_64", "torch": "2.14.1", "onnxruntime": "1.22"})
    base.update(over)
    return LatencyKey(**base)


def _machine(**over):
    return {**_key().machine, **over}


CHANGES = {
    "cpu model": dict(machine=_machine(cpu="Intel Xeon 8480")),
    "core count": dict(machine=_machine(cores=16)),
    "torch version": dict(machine=_machine(torch="2.15.0")),
    "onnxruntime version": dict(machine=_machine(onnxruntime="1.23")),
    "runtime": dict(runtime="onnxruntime"),
    "dtype": dict(dtype="bfloat16"),
    "batch": dict(batch=32),
    "threads": dict(threads=4),
    "method": dict(method="spatial"),
    "stride": dict(geometry=layer_geometry(nn.Conv2d(16, 32, 3, padding=1, stride=2), (16, 8, 8))),
    "input size": dict(geometry=layer_geometry(nn.Conv2d(16, 32, 3, padding=1), (16, 16, 16))),
    "channels": dict(geometry=layer_geometry(nn.Conv2d(16, 64, 3, padding=1), (16, 8, 8))),
    "groups": dict(geometry=layer_geometry(nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 8, 8))),
    "bias": dict(geometry=layer_geometry(nn.Conv2d(16, 32, 3, padding=1, bias=False), (16, 8, 8))),
}


def test_round_trip_and_merge(tmp_path):
    cache = LatencyCache(tmp_path)
    assert cache.get(_key()) is None
    cache.put(_key(), {1: 0.5, 8: 0.75}, dense=1.0)
    cache.put(_key(), {16: 0.9})
    assert cache.get(_key()) == {"dense": 1.0, "ranks": {1: 0.5, 8: 0.75, 16: 0.9}}
    assert cache.get(_key(batch=1)) is not None  # an equal key, built anew, finds it
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("part", sorted(CHANGES))
def test_any_key_part_change_invalidates(part, tmp_path):
    cache = LatencyCache(tmp_path)
    cache.put(_key(), {4: 1.0}, dense=2.0)
    other = _key(**CHANGES[part])
    assert other.digest() != _key().digest()
    assert cache.get(other) is None
    calls = []
    got = cache.measure(other, [4], lambda r: calls.append(r) or 3.0, lambda: 5.0)
    assert calls == [4] and got == {"dense": 5.0, "ranks": {4: 3.0}}
    assert cache.get(_key()) == {"dense": 2.0, "ranks": {4: 1.0}}  # the old entry is untouched


def test_measure_times_only_missing_ranks(tmp_path):
    cache = LatencyCache(tmp_path)
    calls = []
    cache.measure(_key(), [1, 8], lambda r: calls.append(r) or float(r), lambda: calls.append("dense") or 9.0)
    got = cache.measure(_key(), [1, 8, 16], lambda r: calls.append(r) or float(r), lambda: calls.append("dense") or 9.0)
    assert calls == [1, 8, "dense", 16]
    assert got == {"dense": 9.0, "ranks": {1: 1.0, 8: 8.0, 16: 16.0}}


def test_corrupt_or_foreign_files_are_misses(tmp_path):
    cache = LatencyCache(tmp_path)
    cache.path(_key()).write_text("{not json")
    assert cache.get(_key()) is None
    cache.put(_key(), {2: 1.0})  # rewritten
    assert cache.get(_key())["ranks"] == {2: 1.0}
    # a file whose recorded key is another one (hash collision, hand copy) is not trusted
    cache.path(_key(batch=7)).write_text(cache.path(_key()).read_text())
    assert cache.get(_key(batch=7)) is None


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(lc.CACHE_ENV, str(tmp_path / "c"))
    assert LatencyCache().root == tmp_path / "c"
    monkeypatch.delenv(lc.CACHE_ENV)
    assert LatencyCache().root.parts[-3:] == ("rankslim", "latency") or LatencyCache().root.name == "latency"


def test_machine_key_names_cpu_cores_and_versions():
    m = lc.machine_key()
    assert m["cores"] >= 1 and m["cpu"] and m["torch"] == torch.__version__


def test_rank_grid_and_interpolation():
    g = lc.rank_grid(64)
    assert g[0] == 1 and g[-1] == 64 and g == sorted(set(g)) and len(g) >= 5
    assert [r for r in g if r >= 8] == [r for r in g if r >= 8 and (r % 8 == 0 or r == 64)]
    t = {1: 1.0, 9: 5.0}
    assert lc.interpolate(t, 5) == 3.0 and lc.interpolate(t, 20) == 5.0 and lc.interpolate(t, 1) == 1.0


def test_speed_aware_table_costs_measured_time_and_keeps_slow_layers_dense(monkeypatch, tiny_net):
    from rankslim.pipeline import cost_table, select

    sel = select(tiny_net, (1, 8, 8))
    table = cost_table(sel, quantities=("macs",))
    names = [lo.name for lo in table.layers]
    slow = names[0]

    def fake(method, target, ranks, **kw):
        ranks = list(ranks)
        if target.name == slow:  # factorized is never faster than dense here
            return {"dense": 1.0, "ranks": {r: 1.5 for r in ranks}}
        return {"dense": 2.0, "ranks": {r: 0.2 + 1.6 * r / max(ranks) for r in ranks}}
    monkeypatch.setattr(lc, "measure_layer", fake)
    fast, measured = lc.speed_aware_table(sel, table)
    assert set(measured) == set(names)
    for lo, lo2 in zip(table.layers, fast.layers):
        assert lo2.dense == lo.dense and lo2.cost_fn(1).params == lo.cost_fn(1).params
        m = measured[lo.name]
        r = lo.max_rank // 2 or 1
        want = lo.dense.macs * lc.interpolate(m["ranks"], r) / m["dense"]
        assert abs(lo2.cost_fn(r).macs - want) <= 1
    slow_lo = fast.by_name()[slow]
    assert all(fast.decide(slow_lo, r) is None for r in range(1, slow_lo.max_rank + 1))
    ranks = {lo.name: fast.decide(lo, 1) for lo in fast.layers}
    assert ranks[slow] is None and all(ranks[n] is not None for n in names if n != slow)


def test_snap_ranks_moves_to_the_fastest_sampled_rank_within_budget(tiny_net):
    from rankslim.allocate import CostTable, LayerOption
    from rankslim.cost import Cost

    times = {1: 1.0, 4: 3.0, 8: 2.0, 12: 2.5}  # rank 8 is faster than 4..7 (a favoured multiple)
    lo = LayerOption("a", 12, Cost(100, 100), lambda r: Cost(8 * r, int(10 * lc.interpolate(times, r))),
                     torch.ones(12))
    table = CostTable([lo], Cost(100, 100), quantities=("macs",))
    measured = {"a": {"dense": 10.0, "ranks": times}}
    assert lc.snap_ranks(table, {"a": 5}, measured) == {"a": 8}
    assert lc.snap_ranks(table, {"a": 9}, measured) == {"a": 9}  # nothing at or above 9 is faster
    assert lc.snap_ranks(table, {"a": None}, measured) == {"a": None}
    # a params budget that rank 8 (64 params) breaks keeps the chosen rank
    table_p = dataclasses.replace(table, quantities=("params",))
    assert lc.snap_ranks(table_p, {"a": 5}, measured, Budget(params=0.5)) == {"a": 5}
