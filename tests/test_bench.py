"""Measured latency: structure, keys, positivity, and efficiency computed from the measured values (no speed
is asserted: the suite runs on a loaded 2-core box)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import rankslim
from rankslim.bench import add_latency, compare, measure_latency


def _flop_macs(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() // 2 // x.shape[0]


def _check_latency(d, runtime, batch, threads, repeats):
    assert d["runtime"] == runtime and d["batch"] == batch and d["threads"] == threads
    assert len(d["samples_ms"]) == repeats and all(s > 0 for s in d["samples_ms"])
    assert min(d["samples_ms"]) <= d["median_ms"] <= max(d["samples_ms"])
    assert 0 <= d["iqr_ms"] <= max(d["samples_ms"]) - min(d["samples_ms"])
    assert d["peak_mem_bytes"] is None or d["peak_mem_bytes"] >= 0


@pytest.mark.parametrize("runtime", ["eager", "eager-cl", "onnxruntime"])
def test_measure_latency_structure(runtime, tiny_net):
    before = torch.get_num_threads()
    lat = measure_latency(tiny_net.train(), (1, 8, 8), runtime=runtime, threads=2, batch=3, warmup=1, repeats=4)
    _check_latency(lat.to_dict(), runtime, 3, 2, 4)
    assert torch.get_num_threads() == before and tiny_net.training  # threads and training mode restored
    params = sum(p.numel() * 4 for p in tiny_net.parameters())
    assert lat.model_bytes >= (params if runtime != "onnxruntime" else 0.5 * params)
    assert tiny_net.conv1.weight.is_contiguous()  # eager-cl times a channels-last copy, never the user's model


def test_channels_last_copy_computes_the_same():
    from rankslim.bench import channels_last
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    cl, xc = channels_last(net, (x, torch.ones(3)))
    assert cl is not net and net[0].weight.is_contiguous()
    assert cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert xc[0].is_contiguous(memory_format=torch.channels_last) and xc[1].dim() == 1
    with torch.no_grad():
        assert torch.allclose(cl(xc[0]), net(x), atol=1e-6)


def test_per_layer_times_are_inside_the_total(tiny_net):
    lat = measure_latency(tiny_net, torch.randn(2, 1, 8, 8), layers=["conv1", "fc1"], warmup=1, repeats=3)
    assert set(lat.per_layer) == {"conv1", "fc1"} and all(v > 0 for v in lat.per_layer.values())
    assert sum(lat.per_layer.values()) < sum(lat.samples_ms)  # each layer runs inside the timed passes
    assert not tiny_net.conv1._forward_hooks and not tiny_net.conv1._forward_pre_hooks  # hooks removed


def test_bad_arguments_are_one_clear_error(tiny_net):
    with pytest.raises(rankslim.RankslimError, match="runtime"):
        measure_latency(tiny_net, (1, 8, 8), runtime="tensorrt")
    with pytest.raises(rankslim.RankslimError, match="repeats"):
        measure_latency(tiny_net, (1, 8, 8), repeats=0)


def test_compare_efficiency_is_measured_speedup_over_mac_reduction(tiny_net):
    res = rankslim.compress(tiny_net, macs=0.5, input_shape=(1, 8, 8))
    out = compare(tiny_net, res.model, (1, 8, 8), runtimes=("eager", "onnxruntime"), batches=(1, 2), warmup=1,
                  repeats=3).to_dict()
    json.dumps(out)  # JSON-able
    x = torch.randn(1, 1, 8, 8)
    mo, mc = _flop_macs(tiny_net, x), _flop_macs(res.model, x)
    assert mc < mo
    assert [(r["runtime"], r["batch"]) for r in out["rows"]] == [("eager", 1), ("eager", 2), ("onnxruntime", 1),
                                                                  ("onnxruntime", 2)]
    for r in out["rows"]:
        _check_latency(r["original"], r["runtime"], r["batch"], 1, 3)
        _check_latency(r["compressed"], r["runtime"], r["batch"], 1, 3)
        speedup = r["original"]["median_ms"] / r["compressed"]["median_ms"]
        assert math.isclose(r["speedup"], speedup) and math.isclose(r["mac_reduction"], mo / mc)
        assert math.isclose(r["efficiency"], speedup / (mo / mc))
    replaced = {lp.name for lp in res.plan.layers}
    assert {(r["name"], r["batch"]) for r in out["layers"]} == {(n, b) for n in replaced for b in (1, 2)}
    for r in out["layers"]:
        assert r["runtime"] == "eager" and r["original_ms"] > 0 and r["compressed_ms"] > 0
        assert math.isclose(r["efficiency"], (r["original_ms"] / r["compressed_ms"]) / (r["macs_before"] / r["macs_after"]))
    conv1 = tiny_net.conv1  # MACs of one layer, counted here on the layer alone
    with FlopCounterMode(display=False) as fc:
        conv1(x)
    assert next(r for r in out["layers"] if r["name"] == "conv1")["macs_before"] == fc.get_total_flops() // 2


def test_latency_section_in_report(tiny_net):
    res = rankslim.compress(tiny_net, macs=0.5, input_shape=(1, 8, 8))
    d = add_latency(res.report, tiny_net, res.model, (1, 8, 8), warmup=1, repeats=2, per_layer=False)
    assert res.report.metrics["latency"] is d and d["rows"][0]["compressed"]["median_ms"] > 0
    md = res.report.to_markdown()
    assert "## Latency (measured)" in md and "efficiency" in md
    assert not any(line.startswith("latency:") for line in res.report.totals_lines())
    json.dumps(res.report.to_dict(), default=str)


def test_cli_bench_writes_json_and_refuses_bad_input(tmp_path, tiny_net):
    from rankslim.cli import app

    res = rankslim.compress("torchvision:resnet18", macs=0.5, input_shape=(3, 32, 32))
    path = rankslim.save(res.model, tmp_path / "r.rankslim")
    runner = CliRunner()
    got = runner.invoke(app, ["bench", "torchvision:resnet18", "--input-shape", "3,32,32", "-c", str(path),
                              "--batch", "1,2", "--repeats", "2", "--warmup", "0", "--no-per-layer",
                              "--out", str(tmp_path / "b")])
    assert got.exit_code == 0, got.output
    d = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["batch"] for r in d["rows"]] == [1, 2] and all(r["efficiency"] > 0 for r in d["rows"])
    assert "efficiency" in (tmp_path / "b" / "bench.md").read_text()
    for args, msg in ((["--runtime", "tvm"], "--runtime"), (["--batch", "0"], "--batch")):
        bad = runner.invoke(app, ["bench", "torchvision:resnet18", "--input-shape", "3,32,32", *args])
        assert bad.exit_code == 2 and msg in bad.output and "Traceback" not in bad.output


def test_fix_heap_thresholds_applies_in_a_fresh_process():
    """benchmarks/speed.py fixes glibc's malloc thresholds; in a separate process so the suite's own allocator is left
    alone.  True on glibc (this machine); the process still allocates and computes afterwards."""
    import subprocess
    import sys
    code = ("import torch; from rankslim.bench import fix_heap_thresholds; ok = fix_heap_thresholds(); "
            "x = torch.ones(2**20); print(ok, float((x * 2).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(float(2 * 2**20))]
