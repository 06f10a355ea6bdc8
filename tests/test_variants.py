"""Layer variants (issue 9): Conv2d/Linear subclasses compressed through a verified view, Conv1d.

Full-rank exactness is measured on the rebuilt model's outputs (also on input sizes that were never
traced, so dynamic padding must really stay); budgets are measured on the built modules (parameters
counted with ``numel``, MACs with ``FlopCounterMode``), never read from the report.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import rankslim
from rankslim.layers.variants import Conv1dAsConv2d, SubclassForward


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() // 2


class ReflectPadConv(nn.Conv2d):
    """Custom padding in forward: reflect-pad by 1, then the plain conv (padding=0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class WeightStdConv(nn.Conv2d):
    """Weight standardisation: the forward reads its weight outside the conv call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A Linear subclass with extra logic around its linear call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(torch.tanh(x))


def same_conv_net() -> nn.Module:
    from timm.layers import Conv2dSame  # dynamic 'same' padding (TF ports: EfficientNet, MixNet, ...)
    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(3, 16, 3, stride=2), nn.ReLU(), Conv2dSame(16, 24, 3), nn.ReLU(),
                         ReflectPadConv(24, 24, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         ScaledLinear(24, 24), nn.Linear(24, 10)).eval()


def test_timm_conv2dsame_and_custom_padding_are_exact_at_full_rank():
    pytest.importorskip("timm")
    model = same_conv_net()
    x = torch.randn(2, 3, 15, 15)
    res = rankslim.compress(model, "svd", ranks={"0": 16, "2": 24, "4": 24, "8": 24}, input_shape=(3, 15, 15))
    built = res.model.eval()
    for name in ("0", "2", "4", "8"):
        assert isinstance(built.get_submodule(name), SubclassForward), name
    # full rank everywhere (min(m, k) of 16x27, 24x144, 24x216, 24x24): the same function, on the traced size and on sizes never traced
    for shape in ((2, 3, 15, 15), (1, 3, 16, 21), (3, 3, 9, 8)):
        z = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(built(z), model(z), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # the user's model is untouched and still runs


def test_subclasses_compress_under_a_measured_budget_with_data(tmp_path):
    pytest.importorskip("timm")
    model = same_conv_net()
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(64, 3, 15, 15))
    x = torch.randn(1, 3, 15, 15)
    for method in ("svd", "zhang"):
        res = rankslim.compress(model, method, params=0.7, keep_head=True, data=data, calib_samples=32,
                                input_shape=(3, 15, 15))
        assert n_params(res.model) <= 0.7 * n_params(model)
        assert any(isinstance(m, SubclassForward) for m in res.model.modules())
        with torch.no_grad():
            assert torch.isfinite(res.model(torch.randn(2, 3, 17, 13))).all()
        path = rankslim.save(res.model, tmp_path / f"{method}.rankslim")
        back = rankslim.load(path, model=same_conv_net())
        with torch.no_grad():
            assert torch.equal(back(x), res.model.eval()(x))


def test_subclass_reading_its_weight_elsewhere_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(WeightStdConv(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 36, 10)).eval()
    res = rankslim.compress(model, "svd", ratio=0.5, input_shape=(3, 6, 6))
    skipped = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "0" in skipped and "reads its weight" in skipped["0"] and "sub" in skipped["0"]
    assert type(res.model.get_submodule("0")) is WeightStdConv  # left as it was
    assert type(res.model.get_submodule("2")) is not nn.Conv2d  # the plain conv next to it is compressed


class Conv1dNet(nn.Module):
    """Text/audio style: Conv1d stack over (N, C, L) sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(8, 32, 5, padding=2)
        self.c2 = nn.Conv1d(32, 32, 3, stride=2, padding=1, padding_mode="circular")
        self.c3 = nn.Conv1d(32, 32, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(F.relu(self.c3(x)).mean(-1))


def test_conv1d_full_rank_exact_and_budgets_measured():
    torch.manual_seed(0)
    model = Conv1dNet().eval()
    x = torch.randn(3, 8, 40)
    res = rankslim.compress(model, "svd", ranks={"c1": 32, "c2": 32, "c3": 32}, input_shape=(8, 40))
    assert isinstance(res.model.c1, Conv1dAsConv2d)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)
    one = torch.randn(1, 8, 40)
    for method, kw in (("svd", {"macs": 0.5}), ("zhang", {"params": 0.5})):
        res = rankslim.compress(model, method, data=TensorDataset(torch.randn(64, 8, 40)), calib_samples=32,
                                input_shape=(8, 40), **kw)
        if "macs" in kw:
            assert macs(res.model, one) <= 0.5 * macs(model, one)
        else:
            assert n_params(res.model) <= 0.5 * n_params(model)
        with torch.no_grad():
            assert torch.isfinite(res.model(x)).all()
