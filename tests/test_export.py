"""ONNX export of a compressed model runs in onnxruntime with PyTorch's outputs."""
from __future__ import annotations

import rankslim
from rankslim.export import export_onnx


def test_compressed_model_exports_and_matches(tmp_path, tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    dense = export_onnx(tiny_net, (1, 8, 8), tmp_path / "dense.onnx")
    small = export_onnx(res.model, (1, 8, 8), tmp_path / "small.onnx", batch=3)
    assert small.max_abs_diff < 1e-4
    assert small.bytes < dense.bytes
