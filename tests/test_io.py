"""save/load round trips exactly, and refuses damaged files."""
from __future__ import annotations

import pytest
import torch
import torchvision

import rankslim
from tests.conftest import TinyNet


def test_round_trip_identical_outputs(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    fresh = TinyNet()
    loaded = rankslim.load(path, model=fresh)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(loaded(x), res.model.eval()(x), rtol=0, atol=0)
    assert rankslim.get_plan(loaded).to_json() == res.plan.to_json()


def test_round_trip_torchvision_without_model_argument(tmp_path):
    res = rankslim.compress("torchvision:resnet18", macs=0.5, input_shape=(3, 32, 32))
    path = rankslim.save(res.model, tmp_path / "r18.rankslim")
    loaded = rankslim.load(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), res.model.eval()(x), rtol=0, atol=0)


def test_plain_torch_save_of_module_also_works(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    torch.save(res.model, tmp_path / "whole.pt")
    back = torch.load(tmp_path / "whole.pt", weights_only=False)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), res.model(x))


def test_truncated_and_corrupt_files_are_refused(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    data = path.read_bytes()
    (tmp_path / "trunc.rankslim").write_bytes(data[: len(data) // 2])
    with pytest.raises(rankslim.CheckpointError):
        rankslim.load(tmp_path / "trunc.rankslim", model=TinyNet())
    (tmp_path / "junk.rankslim").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(rankslim.CheckpointError):
        rankslim.load(tmp_path / "junk.rankslim", model=TinyNet())
    with pytest.raises(rankslim.CheckpointError, match="no such file"):
        rankslim.load(tmp_path / "missing.rankslim", model=TinyNet())


def test_user_model_file_needs_the_model_definition(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    with pytest.raises(rankslim.ModelSpecError, match="model="):
        rankslim.load(path)


def test_plan_for_other_model_is_refused(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    with pytest.raises((rankslim.PlanError, rankslim.CheckpointError)):
        rankslim.load(path, model=torchvision.models.resnet18())
