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


# ---------------------------------------------------------------------------------- tampered files


def _rewrite_header(src, dst, edit_plan=None, edit_header=None):
    """Copy the safetensors file ``src`` to ``dst`` with its JSON header (and the plan inside) edited."""
    import json
    import struct

    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if edit_plan is not None:
        plan = json.loads(header["__metadata__"]["rankslim_plan"])
        edit_plan(plan)
        header["__metadata__"]["rankslim_plan"] = json.dumps(plan)
    if edit_header is not None:
        edit_header(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


@pytest.fixture
def saved(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, ranks={"conv1": 3, "fc1": 5}, input_shape=(1, 8, 8))
    return rankslim.save(res.model, tmp_path / "m.rankslim")


def _layer(plan, name):
    return next(lp for lp in plan["layers"] if lp["name"] == name)


def _set_info(name, key, value):
    return lambda plan: _layer(plan, name)["info"].__setitem__(key, value)


TAMPERED = {
    "huge rank": (_set_info("fc1", "rank", 10 ** 12), "rank = 1000000000000 is impossible"),
    "rank above the layer": (_set_info("conv1", "rank", 10), "allowed: 1..9"),
    "zero rank": (_set_info("fc1", "rank", 0), "impossible"),
    "negative rank": (_set_info("fc1", "rank", -3), "impossible"),
    "rank as text": (_set_info("fc1", "rank", "5"), "must hold numbers"),
    "rank as bool": (_set_info("fc1", "rank", True), "must hold numbers"),
    "huge float rank": (_set_info("fc1", "rank", 1e15), "impossible"),
    "unknown method": (lambda p: _layer(p, "fc1").__setitem__("method", "svd_evil"), "unknown method 'svd_evil'"),
    "method not a string": (lambda p: _layer(p, "fc1").__setitem__("method", ["svd"]), "string 'method'"),
    "name not a string": (lambda p: _layer(p, "fc1").__setitem__("name", 7), "non-empty string 'name'"),
    "info not an object": (lambda p: _layer(p, "fc1").__setitem__("info", [5]), "object 'info'"),
    "unknown layer field": (lambda p: _layer(p, "fc1").__setitem__("code", "import os"), "unknown fields"),
    "unknown top-level key": (lambda p: p.__setitem__("pickle", "x"), "unknown top-level fields"),
    "layers not a list": (lambda p: p.__setitem__("layers", {"fc1": 1}), "'layers' must be a list"),
    "spec not a string": (lambda p: p.__setitem__("model_spec", 3), "'model_spec'"),
    "bad input shape": (lambda p: p.__setitem__("input_shape", [1, -8, 8]), "'input_shape'"),
    "version not an int": (lambda p: p.__setitem__("version", "1"), "'version'"),
    "missing layer": (lambda p: _layer(p, "fc1").__setitem__("name", "fc9"), "no layer named 'fc9'"),
    "BN layer": (lambda p: (_layer(p, "fc1").__setitem__("name", "bn1"), _layer(p, "bn1").__setitem__(
        "original_type", "BatchNorm2d")), "only replaces Linear and Conv2d"),
    "duplicate layer": (lambda p: p["layers"].append(dict(_layer(p, "fc1"))), "named twice"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_plan_is_refused_before_building_and_model_untouched(case, saved, tmp_path, monkeypatch):
    from torch import nn

    from rankslim.methods import METHODS

    edit, message = TAMPERED[case]
    bad = _rewrite_header(saved, tmp_path / "bad.rankslim", edit_plan=edit)

    def never(*args, **kwargs):
        raise AssertionError("a layer was built from a refused plan")

    monkeypatch.setattr(type(METHODS["svd"]), "structure", never)
    m = TinyNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((rankslim.PlanError, rankslim.CheckpointError), match=message):
        rankslim.load(bad, model=m)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert type(m.fc1) is nn.Linear and type(m.conv1) is nn.Conv2d


def test_tensor_shapes_are_checked_against_the_plan(saved, tmp_path):
    # a legal but different rank: the plan builds fc1 at rank 4, the file holds rank-5 factors
    bad = _rewrite_header(saved, tmp_path / "bad.rankslim", edit_plan=_set_info("fc1", "rank", 4))
    m = TinyNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(rankslim.CheckpointError, match=r"wrong shapes.*fc1"):
        rankslim.load(bad, model=m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())

    def rename_tensor(header):
        header["fc2.extra"] = header.pop("fc2.bias")
    bad = _rewrite_header(saved, tmp_path / "renamed.rankslim", edit_header=rename_tensor)
    with pytest.raises(rankslim.CheckpointError, match=r"missing tensors \['fc2.bias'\].*unexpected tensors \['fc2.extra'\]"):
        rankslim.load(bad, model=TinyNet())


def test_load_returns_a_new_model_and_leaves_the_definition_alone(saved):
    m = TinyNet()
    loaded = rankslim.load(saved, model=m)
    assert loaded is not m and type(m.fc1) is torch.nn.Linear and type(loaded.fc1) is not torch.nn.Linear
