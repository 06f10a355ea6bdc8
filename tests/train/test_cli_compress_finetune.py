"""`rankslim compress` with --finetune-epochs / --distill and --max-drop: accuracies before, after compression and
after fine-tuning recorded and re-measured on the saved model; nonsense refused in one line (exit 2)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import rankslim
from rankslim.cli import app
from rankslim.data import load_dataset
from tests.train._models import trained_tiny

runner = CliRunner()
SPEC = "tests.train._models:trained_tiny"
BASE = ["--input-shape", "1,8,8", "--data", "digits", "--no-keep-head"]


def _test_accuracy(model) -> float:
    x, y = load_dataset("digits", "test").tensors
    with torch.no_grad():
        return int((model.eval()(x).argmax(1) == y).sum()) / len(y)


@pytest.mark.parametrize("distill", ["--distill", "--no-distill"])
def test_compress_then_finetune_records_three_accuracies(tmp_path, distill):
    out = tmp_path / "o"
    r = runner.invoke(app, ["compress", SPEC, *BASE, "--params", "0.25", "--finetune-epochs", "3",
                            "--finetune-lr", "0.01", distill, "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "report.json").read_text())["metrics"]
    saved = rankslim.load(out / "model.rankslim", model=trained_tiny())
    assert m["accuracy_before"] == pytest.approx(_test_accuracy(trained_tiny()), abs=1e-9)
    assert m["accuracy_finetuned"] == pytest.approx(_test_accuracy(saved), abs=1e-9)
    assert m["accuracy_after"] == m["accuracy_finetuned"]
    # a quarter of the parameters costs accuracy that the fine-tune wins back
    assert m["accuracy_compressed"] < m["accuracy_before"] - 0.02
    assert m["accuracy_finetuned"] > m["accuracy_compressed"]
    assert m["finetune"]["distill"] is (distill == "--distill") and m["finetune"]["epochs"] == 3
    assert sum(p.numel() for p in saved.parameters()) <= 0.25 * sum(p.numel() for p in trained_tiny().parameters())


def test_cli_max_drop_writes_search_log(tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["compress", SPEC, *BASE, "--max-drop", "3%", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "max-drop search" in r.output
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["max_drop"]["max_drop"] == pytest.approx(0.03)
    assert len(m["max_drop_search"]) >= 3
    saved = rankslim.load(out / "model.rankslim", model=trained_tiny())
    n0 = sum(p.numel() for p in trained_tiny().parameters())
    assert sum(p.numel() for p in saved.parameters()) <= m["max_drop"]["chosen_budget"] * n0 + 1


@pytest.mark.parametrize("args,needle", [
    (["--max-drop", "-1"], "max_drop"),
    (["--max-drop", "150%"], "max_drop"),
    (["--max-drop", "1%", "--ratio", "0.5"], "max_drop"),
    (["--params", "0.5", "--finetune-epochs", "-2"], "finetune-epochs"),
])
def test_cli_nonsense_refused_in_one_line(tmp_path, args, needle):
    r = runner.invoke(app, ["compress", SPEC, *BASE, *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_cli_finetune_needs_data(tmp_path):
    r = runner.invoke(app, ["compress", SPEC, "--input-shape", "1,8,8", "--params", "0.5", "--finetune-epochs", "1",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--data" in r.output


def test_a_diverging_finetune_keeps_the_compressed_model(tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["compress", SPEC, *BASE, "--params", "0.5", "--finetune-epochs", "1",
                            "--finetune-lr", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    assert m["finetune"]["kept"] == "compressed"
    assert m["finetune"]["held_out_after"] < m["finetune"]["held_out_before"]
    saved = rankslim.load(out / "model.rankslim", model=trained_tiny())
    assert m["accuracy_finetuned"] == m["accuracy_compressed"] == pytest.approx(_test_accuracy(saved), abs=1e-9)
    assert any("kept" in n for n in rep["notes"])
