"""CLI: `rankslim finetune` / `rankslim train` write their own files into --out; errors are one line, exit 2."""
from __future__ import annotations

import torch
from typer.testing import CliRunner

import rankslim
from rankslim.cli import app
from tests.conftest import TinyNet

runner = CliRunner()


def test_finetune_and_train_commands(tmp_path):
    torch.manual_seed(0)
    comp = rankslim.compress(TinyNet(), "svd", params=0.6, input_shape=(1, 8, 8)).model
    src = rankslim.save(comp, tmp_path / "tiny.rankslim")
    out = tmp_path / "ft"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["finetune", str(src), "--base", "tests.conftest:TinyNet", "--data", "digits",
                            "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"notes.txt", "model.rankslim", "metrics.csv", "curves.png",
                                               "checkpoint.pt"}
    assert (out / "notes.txt").read_text() == "mine"
    loaded = rankslim.load(out / "model.rankslim", model=TinyNet())
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in comp.parameters())
    # a second run into the same directory without --resume is refused, not overwritten
    r = runner.invoke(app, ["finetune", str(src), "--base", "tests.conftest:TinyNet", "--data", "digits",
                            "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 2 and "resume" in r.output

    out2 = tmp_path / "lrpet"
    r = runner.invoke(app, ["train", "--method", "lrpet", "tests.conftest:TinyNet", "--data", "digits",
                            "--rank-ratio", "0.5", "--epochs", "1", "--lr", "0.05", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out2.iterdir()} == {"model.rankslim", "metrics.csv", "curves.png", "checkpoint.pt"}
    compact = rankslim.load(out2 / "model.rankslim", model=TinyNet())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in TinyNet().parameters())


def test_cli_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["finetune", str(tmp_path / "missing.rankslim"), "--data", "digits"])
    assert r.exit_code == 2 and "error" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--method", "nope", "tests.conftest:TinyNet", "--data", "digits"])
    assert r.exit_code == 2 and "lrpet" in r.output
