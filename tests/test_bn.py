"""BatchNorm re-estimation: running stats become the exact statistics of the calibration inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankslim
from rankslim.bn import recalibrate_bn


def _bn_inputs(model: nn.Module, bn: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``bn`` receives on each batch, recorded by a forward pre-hook in a plain eval-mode pass."""
    seen: list[torch.Tensor] = []
    h = bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x in batches:
            model.eval()(x)
    h.remove()
    return seen


def test_running_stats_are_the_calibration_statistics(tiny_net):
    res = rankslim.compress(tiny_net, ranks={"conv1": 3}, input_shape=(1, 8, 8))
    model = res.model.eval()
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 8, 8, generator=g) + 0.5 for _ in range(4)]
    # BN's input does not depend on BN's own statistics, so an eval pass sees exactly what recalibration sees
    acts = _bn_inputs(model, model.bn1, batches)
    assert recalibrate_bn(model, batches) == 1
    # cumulative average over equal-size batches: mean of the batch means, mean of the unbiased batch variances
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).flatten(1).var(1, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.bn1.running_mean, before["bn1.running_mean"])
    assert not model.training and model.bn1.momentum == 0.1
    # nothing but the BN statistics changed
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith("bn1.running_") and k != "bn1.num_batches_tracked":
            assert torch.equal(after[k], v), k


class _DropoutBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.drop(self.fc(x)))


def test_dropout_stays_off_and_modes_are_restored():
    torch.manual_seed(0)
    model = _DropoutBN()
    model.train()
    model.fc.eval()  # a mixed state must come back as it was
    batches = [torch.randn(32, 6) for _ in range(3)]
    twin = copy.deepcopy(model)
    acts = _bn_inputs(twin, twin.bn, batches)  # eval pass: dropout off
    model.train()
    model.fc.eval()
    recalibrate_bn(model, [(x, torch.zeros(32)) for x in batches])  # (inputs, labels) pairs are accepted
    torch.testing.assert_close(model.bn.running_mean, torch.cat(acts).mean(0), rtol=1e-5, atol=1e-6)
    assert model.training and model.drop.training and not model.fc.training


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batches_are_refused_and_stats_kept(bad):
    torch.manual_seed(0)
    model = _DropoutBN().eval()
    model.bn.running_mean.fill_(0.25)
    good = torch.randn(8, 6)
    poisoned = torch.randn(8, 6)
    poisoned[3, 2] = bad
    with pytest.raises(rankslim.DataError, match="NaN or Inf"):
        recalibrate_bn(model, [good, poisoned])
    # the first batch was already averaged in: the refusal rolls it back
    assert torch.equal(model.bn.running_mean, torch.full((6,), 0.25))
    assert model.bn.momentum == 0.1 and not model.training


def test_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 3))
    assert recalibrate_bn(model, [torch.randn(2, 3)]) == 0


def test_compress_flag_needs_data(tiny_net):
    with pytest.raises(rankslim.RankslimError, match="calibration"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), bn_recalibrate=True)
    res = rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), bn_recalibrate=True, data="digits",
                            calib_samples=64)
    assert any("BatchNorm" in n for n in res.report.notes)
