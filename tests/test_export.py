"""ONNX export of every factorized layer type (checked here in onnxruntime), int8, compact sparse files."""
from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import rankslim
from rankslim.export import export_file, export_onnx
from tests.conftest import TinyNet

# method -> a layer class the compressed TinyNet must contain (so every layer type is exported at least once)
LAYER_OF = {"svd": "LowRankConv2d", "spatial": "SpatialConv2d", "tucker": "TuckerConv2d", "cp": "CPConv2d",
            "tt": "TTLinear", "prune": "SparseConv2d", "godec": "LowRankSparseConv2d"}


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_compressed_model_exports_and_matches(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    dense = export_onnx(tiny_net, (1, 8, 8), tmp_path / "dense.onnx")
    small = export_onnx(res.model, (1, 8, 8), tmp_path / "small.onnx", batch=3)
    assert small.max_abs_diff < 1e-4
    assert small.bytes < dense.bytes


@pytest.mark.parametrize("method", sorted(LAYER_OF))
def test_every_layer_type_runs_in_onnxruntime_like_pytorch(method, tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, method, ratio=0.5, input_shape=(1, 8, 8), keep_head=False)
    types = {type(m).__name__ for m in res.model.modules()}
    assert LAYER_OF[method] in types or (method == "tt" and "TTLinear" in types)
    export_onnx(res.model, (1, 8, 8), tmp_path / "m.onnx")
    # a batch size the export never saw: the batch dimension must be dynamic
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = res.model.eval()(x)
    got = _ort(tmp_path / "m.onnx", x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))


def test_int8_file_is_smaller_and_close(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    res = rankslim.compress(net, ranks={"1": 32, "3": 32}, input_shape=(1, 8, 8), keep_head=False)
    path = rankslim.save(res.model, tmp_path / "m.rankslim")
    out = export_file(path, tmp_path / "m.onnx", int8=True, model=net, measure=True, repeats=2)
    fp32, q = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert fp32.is_file() and q.is_file() and not list(tmp_path.glob("*.tmp*"))
    assert q.stat().st_size < 0.6 * fp32.stat().st_size
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = res.model.eval()(x)
    got = _ort(q, x)
    assert float((got - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert set(out.latency) == {"fp32", "int8"} and all(v["median_ms"] > 0 for v in out.latency.values())


# ----------------------------------------------------------------------------------- compact sparse files


def _dense_file_bytes(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def test_pruned_file_is_smaller_than_dense_and_round_trips_exactly(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, "prune", params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "p.rankslim")
    assert path.stat().st_size < _dense_file_bytes(tiny_net, tmp_path / "dense.safetensors")
    loaded = rankslim.load(path, model=TinyNet())
    a, b = loaded.state_dict(), res.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(loaded(x), res.model.eval()(x), rtol=0, atol=0)


def test_lowrank_plus_sparse_round_trips_exactly(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, "godec", params=0.6, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "ls.rankslim")
    loaded = rankslim.load(path, model=TinyNet())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), res.model.eval()(x), rtol=0, atol=0)


def test_very_sparse_layer_uses_indices_and_round_trips(tmp_path):
    from rankslim.layers.sparse import SparseLinear
    from rankslim.plan import LayerPlan, Plan, attach_plan

    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 100)
    net = torch.nn.Sequential(lin)
    mask = torch.rand(100, 200) < 0.01  # 1%: 4 bytes per index beat a 2,500-byte bit mask
    sp = SparseLinear.like(lin).set_sparse(lin.weight.detach() * mask, mask, lin.bias.detach())
    comp = attach_plan(torch.nn.Sequential(sp), Plan([LayerPlan("0", "prune", {"nnz": int(mask.sum())}, "Linear")]))
    path = rankslim.save(comp, tmp_path / "s.rankslim")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["rankslim_sparse"])
        keys = set(f.keys())
    assert meta["0"]["encoding"] == "index" and "0.mask.sparse_index" in keys and "0.weight" not in keys
    loaded = rankslim.load(path, model=net)
    assert torch.equal(loaded[0].mask, mask) and torch.equal(loaded[0].masked_weight(), sp.masked_weight())


def test_tampered_sparse_values_are_refused(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, "prune", params=0.5, input_shape=(1, 8, 8))
    path = rankslim.save(res.model, tmp_path / "p.rankslim")
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    sparse = json.loads(header["__metadata__"]["rankslim_sparse"])
    sparse["fc1"]["shape"] = [64, 256]  # the support no longer fits the recorded shape
    header["__metadata__"]["rankslim_sparse"] = json.dumps(sparse)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "bad.rankslim"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(rankslim.CheckpointError, match="fc1"):
        rankslim.load(bad, model=TinyNet())


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_export_writes_checked_files_and_refuses_to_overwrite(tmp_path):
    from rankslim.cli import app

    res = rankslim.compress("torchvision:resnet18", macs=0.5, input_shape=(3, 32, 32))
    path = rankslim.save(res.model, tmp_path / "r.rankslim")
    runner = CliRunner()
    got = runner.invoke(app, ["export", str(path), "--onnx", str(tmp_path / "r.onnx"), "--no-measure"])
    assert got.exit_code == 0, got.output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = res.model.eval()(x)
    assert np.abs(_ort(tmp_path / "r.onnx", x).numpy() - ref.numpy()).max() < 1e-3
    before = (tmp_path / "r.onnx").read_bytes()
    again = runner.invoke(app, ["export", str(path), "--onnx", str(tmp_path / "r.onnx"), "--no-measure"])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    assert (tmp_path / "r.onnx").read_bytes() == before
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.rankslim"), "--onnx", str(tmp_path / "n.onnx")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_zoo_vit_exports_with_a_dynamic_batch(tmp_path):
    # the class token used to be expanded by len(z): traced as a constant, the file failed at any other batch
    from rankslim.zoo import resolve_model

    model = resolve_model("zoo:vit").model
    path = tmp_path / "vit.onnx"
    export_onnx(model, (1, 28, 28), path, check=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in (1, 5):
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {name: x.numpy()})[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
