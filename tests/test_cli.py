"""The CLI: a thin shell over the API — outputs written atomically, errors clear with a non-zero exit."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import rankslim
from rankslim.cli import app

runner = CliRunner()
TINY = "tests.conftest:TinyNet"


def test_compress_writes_model_and_reports(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "--data", "digits",
                            "--eval-samples", "200", "--out", str(out), "--onnx"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"model.rankslim", "report.json", "report.md", "model.onnx"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["fractions"]["params"] <= 0.5
    assert 0.0 <= rep["metrics"]["accuracy_after"] <= 1.0
    assert "conv2" in r.output and "kept" in r.output
    from tests.conftest import TinyNet
    loaded = rankslim.load(out / "model.rankslim", model=TinyNet())
    assert rankslim.get_plan(loaded).layers


def test_zoo_model_reports_accuracy_before_and_after(tmp_path):
    out = tmp_path / "lenet"
    r = runner.invoke(app, ["compress", "zoo:lenet5", "--macs", "0.6", "--eval-samples", "500", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["dataset"] == "fashion-mnist" and m["accuracy_before"] > 0.8


@pytest.mark.parametrize("args,needle", [
    (["compress", "zoo:nope", "--params", "0.5"], "zoo"),
    (["compress", "torchvision:not_a_model", "--params", "0.5"], "torchvision"),
    (["compress", TINY, "--input-shape", "3,32,32", "--params", "0.5"], "input"),
    (["compress", TINY, "--input-shape", "1,8,8", "--params", "0.001"], "budget"),
    (["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "--method", "nope"], "unknown method"),
])
def test_errors_exit_nonzero_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    r = runner.invoke(app, args + ["--out", str(out)])
    assert r.exit_code == 2
    assert needle.lower() in r.output.lower()
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.0001", "--out", str(out)])
    assert r.exit_code == 2
    assert (out / "keep.txt").read_text() == "x"


def test_inspect_writes_energy_plot(tmp_path):
    r = runner.invoke(app, ["inspect", TINY, "--input-shape", "1,8,8", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    png = tmp_path / "energy.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "r@90%" in r.output and "depthwise" in r.output


def test_methods_lists_registry():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "svd" in r.output and "cptv" in r.output


def test_method_and_allocator_options_reach_the_api(tmp_path, monkeypatch):
    import rankslim.api as api
    seen = {}
    real = api.compress

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(api, "compress", spy)
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "-M", "eps=0.05",
                            "-M", 'activation={"fc2": "linear"}', "-A", "iters=30", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert seen["method_options"] == {"eps": 0.05, "activation": {"fc2": "linear"}}
    assert seen["allocator_options"] == {"iters": 30}
    bad = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "-M", "novalue"])
    assert bad.exit_code == 2 and "key=value" in bad.output
