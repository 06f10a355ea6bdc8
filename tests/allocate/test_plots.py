"""plot_layer_costs writes a PNG of the per-layer reductions."""
from __future__ import annotations

import pytest

import rankslim
from rankslim.plots import plot_layer_costs


def test_plot_layer_costs(tiny_net, tmp_path):
    res = rankslim.compress(tiny_net, "svd", params=0.5, macs=0.5, allocator="pos-cvx", input_shape=(1, 8, 8))
    out = plot_layer_costs(res.report, tmp_path / "costs.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    with pytest.raises(ValueError):
        plot_layer_costs(res.report, tmp_path / "x.png", quantity="latency")
