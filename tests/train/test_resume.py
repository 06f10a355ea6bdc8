"""Checkpoint / resume: a run stopped after epoch 1 and resumed ends bit-identical to an uninterrupted run (CPU)."""
from __future__ import annotations

import csv

import pytest
import torch

import rankslim.train.loop as loop
from rankslim.errors import CheckpointError
from rankslim.train import finetune, train_lrpet
from tests.conftest import TinyNet


class Killed(Exception):
    pass


def _run(kind: str, out, resume: bool = False):
    torch.manual_seed(0)
    net = TinyNet()
    if kind == "finetune":
        teacher = TinyNet()
        return finetune(net, "digits", teacher=teacher, epochs=3, lr=0.05, patience=5, checkpoint_dir=out,
                        resume=resume, seed=3).model
    return train_lrpet(net, "digits", rank_ratio=0.5, epochs=3, lr=0.05, period=7, checkpoint_dir=out,
                       resume=resume, seed=3).projected_model


@pytest.mark.parametrize("kind", ["finetune", "lrpet"])
def test_resume_after_kill_equals_uninterrupted(kind, tmp_path, monkeypatch):
    ref = _run(kind, tmp_path / "ref")
    # "kill" the second run right after its first checkpoint: the metrics file is written just after it
    real = loop.write_metrics_csv
    calls = {"n": 0}

    def dying(rows, path):
        real(rows, path)
        calls["n"] += 1
        raise Killed()
    monkeypatch.setattr(loop, "write_metrics_csv", dying)
    with pytest.raises(Killed):
        _run(kind, tmp_path / "run")
    monkeypatch.setattr(loop, "write_metrics_csv", real)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(CheckpointError):  # never overwrite an earlier run's checkpoint silently
        _run(kind, tmp_path / "run")
    resumed = _run(kind, tmp_path / "run", resume=True)
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # exact: same seeds, same order of operations on CPU
        assert torch.equal(a[k], b[k]), k
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    ref_rows = list(csv.DictReader(open(tmp_path / "ref" / "metrics.csv")))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_with_other_settings_is_refused(tmp_path):
    torch.manual_seed(0)
    finetune(TinyNet(), "digits", epochs=1, lr=0.05, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="lr"):
        finetune(TinyNet(), "digits", epochs=1, lr=0.1, checkpoint_dir=tmp_path, resume=True)
