"""BatchNorm re-estimation: running stats become the exact statistics of the calibration inputs."""
from __future__ import annotations

import pytest
import torch

import rankslim
from rankslim.bn import recalibrate_bn


def test_running_mean_is_the_calibration_mean(tiny_net):
    res = rankslim.compress(tiny_net, ranks={"conv1": 3}, input_shape=(1, 8, 8))
    model = res.model
    batches = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    seen = []
    h = model.conv1.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    assert recalibrate_bn(model, batches) == 1
    h.remove()
    acts = torch.cat(seen)
    torch.testing.assert_close(model.bn1.running_mean, acts.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not model.training and model.bn1.momentum == 0.1
    # other weights are untouched
    torch.testing.assert_close(model.conv1.first.weight, res.model.conv1.first.weight)


def test_compress_flag_needs_data(tiny_net):
    with pytest.raises(rankslim.RankslimError, match="calibration"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), bn_recalibrate=True)
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), bn_recalibrate=True, data="digits",
                            calib_samples=64)
    assert any("BatchNorm" in n for n in res.report.notes)
