"""The analytic cost model agrees with torch's FlopCounterMode, before and after compression."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import rankslim
from rankslim.cost import flop_counter_macs, model_cost

TV_MODELS = ["resnet18", "vgg11", "mobilenet_v2"]


@pytest.mark.parametrize("name", TV_MODELS)
def test_macs_match_flop_counter_on_torchvision(name):
    model = torchvision.models.get_model(name, weights=None)
    shape = (3, 64, 64)
    mc = model_cost(model, shape)
    assert mc.total.macs == flop_counter_macs(model, shape)
    assert mc.total.params == sum(p.numel() for p in model.parameters())


def test_macs_match_flop_counter_after_compression(tiny_net):
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8))
    mc = model_cost(res.model, (1, 8, 8))
    assert mc.total.macs == flop_counter_macs(res.model, (1, 8, 8))
    assert res.report.compressed.macs == mc.total.macs
    assert res.report.compressed.params == sum(p.numel() for p in res.model.parameters())


def test_linear_on_tokens_counts_every_position():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    shape = (7, 16)  # 7 tokens of width 16
    assert model_cost(model, shape).total.macs == 7 * (16 * 32 + 32 * 8) == flop_counter_macs(model, shape)


def test_wrong_input_shape_is_a_clear_error(tiny_net):
    with pytest.raises(rankslim.InputShapeError, match="input shape"):
        model_cost(tiny_net, (3, 8, 8))


class _ConvTwiceTied(nn.Module):
    """A conv applied twice and two Linear layers sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Linear(4 * 6 * 6, 8)
        self.b = nn.Linear(4 * 6 * 6, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.conv(x))).flatten(1)
        return self.a(x) + self.b(x)


def test_reused_conv_and_tied_weight_are_counted_like_torch():
    model = _ConvTwiceTied()
    shape = (4, 6, 6)
    mc = model_cost(model, shape)
    assert mc.total.macs == flop_counter_macs(model, shape)
    assert mc.layers["conv"].macs == 2 * 6 * 6 * 4 * 4 * 9  # both calls
    assert mc.total.params == sum(p.numel() for p in model.parameters())  # the shared weight once
