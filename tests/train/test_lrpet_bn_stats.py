"""After LRPET's last projection, BatchNorm running statistics describe the projected weights (not stale ones)."""
from __future__ import annotations

import torch
from torch import nn

from rankslim.data import calibration_batches, load_dataset
from rankslim.train import train_lrpet
from rankslim.train.loop import training_split


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_bn_running_stats_match_the_projected_weights():
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    res = train_lrpet(ConvBN(), train, rank_ratio=0.5, epochs=1, lr=0.05, seed=0, recalibrate_bn_samples=256)
    model = res.projected_model.eval()
    got = []
    h = model.b2.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    train_part, _, _ = training_split(train, 0.1, 0)  # what train_lrpet trains (and re-estimates BN) on
    with torch.no_grad():
        for b in calibration_batches(train_part, 256, seed=0):
            model(b)
    h.remove()
    x = torch.cat(got).transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(model.b2.running_mean, x.mean(1), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model.b2.running_var, x.var(1), atol=1e-4, rtol=1e-2)
