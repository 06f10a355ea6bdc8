"""The CLI: a thin shell over the API — outputs written atomically, errors clear with a non-zero exit."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rankslim
from rankslim.cli import app
from rankslim.outputs import MARKER

runner = CliRunner()
TINY = "tests.conftest:TinyNet"


def test_compress_writes_model_and_reports(tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "--data", "digits",
                            "--eval-samples", "200", "--out", str(out), "--onnx"])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"model.rankslim", "report.json", "report.md", "model.onnx", MARKER}
    rep = json.loads((out / "report.json").read_text())
    assert "conv2" in r.output and "kept" in r.output
    from tests._measure import count_params
    from tests.conftest import TinyNet
    loaded = rankslim.load(out / "model.rankslim", model=TinyNet())
    assert rankslim.get_plan(loaded).layers
    assert count_params(loaded) <= 0.5 * count_params(TinyNet())
    # the reported accuracy is the saved model's, re-measured here on the same 200 test images
    import torch
    from rankslim.data import load_dataset
    x, y = load_dataset("digits", "test").tensors
    with torch.no_grad():
        acc = int((loaded.eval()(x[:200]).argmax(1) == y[:200]).sum()) / 200
    assert rep["metrics"]["accuracy_after"] == pytest.approx(acc, abs=1e-9)


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
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.0001", "--out", str(out),
                            "--force"])
    assert r.exit_code == 2 and "budget" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "x"


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
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "-m", "ddlr", "--include",
                            "fc*", "--data", "digits", "--calib-samples", "32", "--eval-samples", "50", "-M", "eps=0.05",
                            "-M", 'activation={"fc2": "linear"}', "-A", "iters=30", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert seen["method_options"] == {"eps": 0.05, "activation": {"fc2": "linear"}}
    assert seen["allocator_options"] == {"iters": 30}
    bad = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", "-M", "novalue"])
    assert bad.exit_code == 2 and "key=value" in bad.output


# --- output safety (issue 8): the user's files are never deleted or overwritten ----------------------------------

FAST = ["--input-shape", "1,8,8", "--params", "0.5"]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


def _one_line_error(r, code: int = 2) -> str:
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def _user_dir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"my notes\n")
    (d / "report.md").write_text("my own report, not rankslim's")
    import torch
    from tests.conftest import TinyNet
    torch.save(TinyNet(), d / "net.pt")
    return d


def test_foreign_directory_is_refused_and_left_byte_identical(tmp_path):
    d = _user_dir(tmp_path)
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["compress", TINY, *FAST, "--out", str(d)])
    assert "--force" in _one_line_error(r)
    assert _snapshot(tmp_path) == before


def test_out_dot_refuses_the_working_directory(tmp_path, monkeypatch):
    d = _user_dir(tmp_path)
    monkeypatch.chdir(d)
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["compress", str(d / "net.pt"), *FAST, "--out", "."])
    _one_line_error(r)
    assert _snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused_even_with_force(tmp_path):
    d = _user_dir(tmp_path)
    before = _snapshot(tmp_path)
    for out in (d / "net.pt", d / "net.pt" / "sub"):  # the input model itself, and a path under a regular file
        r = runner.invoke(app, ["compress", str(d / "net.pt"), *FAST, "--out", str(out), "--force"])
        _one_line_error(r)
    assert _snapshot(tmp_path) == before


def test_force_writes_only_our_files_and_deletes_nothing(tmp_path):
    d = _user_dir(tmp_path)
    before = _snapshot(d)
    r = runner.invoke(app, ["compress", TINY, *FAST, "--out", str(d), "--force"])
    assert r.exit_code == 0, r.output
    after = _snapshot(d)
    assert set(after) - set(before) == {"model.rankslim", "report.json", MARKER}
    # report.md is one of our names, so --force replaces it; every other user file is byte-identical
    assert all(after[k] == v for k, v in before.items() if k != "report.md")
    assert after["report.md"].startswith(b"# rankslim report")


def test_our_own_directory_is_rewritten_without_force(tmp_path):
    out = tmp_path / "o"
    for budget in ("0.5", "0.6"):
        r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", budget, "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["budget"]["params"] == 0.6


def test_an_output_name_taken_by_a_directory_is_refused(tmp_path):
    out = tmp_path / "o"
    assert runner.invoke(app, ["compress", TINY, *FAST, "--out", str(out)]).exit_code == 0
    (out / "report.json").unlink()
    (out / "report.json").mkdir()
    (out / "report.json" / "x.txt").write_text("user")
    before = _snapshot(tmp_path)
    _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, "--out", str(out), "--force"]))
    assert _snapshot(tmp_path) == before


def test_a_write_failing_midway_leaves_the_previous_outputs(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert runner.invoke(app, ["compress", TINY, *FAST, "--out", str(out)]).exit_code == 0
    before = _snapshot(tmp_path)
    from rankslim.report import Report

    def broken(self, path):
        Path(path).write_text("{ half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "save_json", broken)
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.3", "--out", str(out)])
    assert r.exit_code == 2 and "No space left" in r.output
    assert _snapshot(tmp_path) == before  # model.rankslim, written before the failure, was not replaced


def test_default_out_is_named_after_model_method_and_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--ratio", "0.25"])
    assert r.exit_code == 0, r.output
    dirs = sorted(p.name for p in (tmp_path / "rankslim-out").iterdir())
    assert dirs == ["tests.conftest-TinyNet-svd-params0.5", "tests.conftest-TinyNet-svd-ratio0.25"]
    assert all((tmp_path / "rankslim-out" / n / "model.rankslim").is_file() for n in dirs)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_out_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, "--out", str(ro / "o")]))
    finally:
        ro.chmod(0o700)


def test_inspect_follows_the_same_rules(tmp_path):
    d = _user_dir(tmp_path)
    before = _snapshot(tmp_path)
    _one_line_error(runner.invoke(app, ["inspect", TINY, "--input-shape", "1,8,8", "--out", str(d)]))
    assert _snapshot(tmp_path) == before
    r = runner.invoke(app, ["inspect", TINY, "--input-shape", "1,8,8", "--out", str(d), "--force"])
    assert r.exit_code == 0, r.output
    after = _snapshot(tmp_path)
    assert set(after) - set(before) == {"work/energy.png", f"work/{MARKER}"}
    assert all(after[k] == v for k, v in before.items())


# --- bad input: one line, exit 2; bugs: "internal error", exit 1 --------------------------------------------------

def test_inspect_on_a_module_file_without_input_shape(tmp_path):
    d = _user_dir(tmp_path)
    line = _one_line_error(runner.invoke(app, ["inspect", str(d / "net.pt"), "--out", str(tmp_path / "i")]))
    assert "--input-shape" in line
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize("args,needle", [
    (["-A", "nonsense=1"], "nonsense"),
    (["-a", "cptv", "-A", "iters=abc"], "iters"),
    (["-m", "ddlr", "--data", "digits", "--calib-samples", "32", "-M", "eps=abc"], "eps"),
    (["-M", "=1"], "key=value"),
])
def test_bad_method_or_allocator_options_are_one_line(tmp_path, args, needle):
    out = tmp_path / "o"
    line = _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, *args, "--out", str(out)]))
    assert needle in line
    assert not out.exists()


@pytest.mark.parametrize("args", [["--params", "abc"], ["--input-shape", "1,a,8"], ["--round-to", "x"],
                                  ["--params", "nan"]])
def test_non_numeric_values_exit_2_without_traceback(tmp_path, args):
    r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--params", "0.5", *args,
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_a_bug_is_reported_as_internal_error_exit_1(tmp_path, monkeypatch):
    import rankslim.api as api

    def buggy(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(api, "compress", buggy)
    line = _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, "--out", str(tmp_path / "o")]), code=1)
    assert "internal error" in line and "KeyError" in line and "report" in line
    assert not (tmp_path / "o").exists()


def test_type_errors_from_deep_code_blame_options_only_when_options_were_given(tmp_path, monkeypatch):
    import rankslim.api as api

    def deep(*a, **k):
        return range(k["allocator_options"].get("iters", 1.5))  # TypeError, as a float reaching range() gives

    monkeypatch.setattr(api, "compress", deep)
    line = _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, "-A", 'iters="3"',
                                               "--out", str(tmp_path / "o")]))
    assert "--allocator-option" in line and "iters" in line
    # the same TypeError with no -M/-A option given can only be a bug
    line = _one_line_error(runner.invoke(app, ["compress", TINY, *FAST, "--out", str(tmp_path / "o")]), code=1)
    assert "internal error" in line and "TypeError" in line
    assert not (tmp_path / "o").exists()


# --- accuracy warning, keep-head ----------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,warned", [(0.9, 0.5, True), (0.9, 0.88, False)])
def test_accuracy_drop_warns_and_is_recorded(tmp_path, monkeypatch, before, after, warned):
    import rankslim.data
    values = iter([before, after])
    monkeypatch.setattr(rankslim.data, "evaluate_accuracy", lambda *a, **k: next(values))
    out = tmp_path / "o"
    r = runner.invoke(app, ["compress", TINY, *FAST, "--data", "digits", "--calib-samples", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert ("warning: accuracy fell" in r.output) is warned
    assert ("warning: accuracy fell from 90.0% to 50.0%" in r.output and "fine-tuning" in r.output) is warned
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["accuracy_drop"] == pytest.approx(before - after)


def test_keep_head_flag_reaches_the_api(tmp_path, monkeypatch):
    import rankslim.api as api
    seen = []
    real = api.compress

    def spy(*a, **k):
        seen.append(k["keep_head"])
        return real(*a, **k)

    monkeypatch.setattr(api, "compress", spy)
    for flag in ([], ["--no-keep-head"], ["--keep-head"]):
        r = runner.invoke(app, ["compress", TINY, *FAST, *flag, "--out", str(tmp_path / "o")])
        assert r.exit_code == 0, r.output
    assert seen == [True, False, True]


def test_keep_head_is_the_default_and_no_keep_head_makes_the_head_a_target(tmp_path):
    reports = {}
    for flag in ([], ["--no-keep-head"]):
        out = tmp_path / ("no-keep" if flag else "default")
        r = runner.invoke(app, ["compress", TINY, "--input-shape", "1,8,8", "--ratio", "0.25", *flag,
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        reports[bool(flag)] = json.loads((out / "report.json").read_text())
    # TinyNet's logits come from fc2: kept dense and listed as skipped by default, a target row otherwise
    assert "fc2" in {s["name"] for s in reports[False]["skipped"]}
    assert "fc2" not in {row["name"] for row in reports[False]["rows"]}
    assert "fc2" in {row["name"] for row in reports[True]["rows"]}
