"""Shared test set-up: one thread per worker (the suite runs with -n 2 on 2 cores), no timing-dependent defaults,
a private latency cache, and small models."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

# compress()'s default speed_aware="auto" may time layers and let the timings choose ranks; on a shared machine
# that would make results depend on other jobs.  "off" keeps every test MAC-only unless it asks for speed-aware
# mode itself; tests of auto mode (tests/test_speed_default.py) unset it.
os.environ["RANKSLIM_SPEED_AWARE"] = "off"


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    """Timings measured by tests go to a directory of this session, never to the user's ~/.cache/rankslim."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RANKSLIM_CACHE_DIR", str(tmp_path_factory.mktemp("latency-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _deterministic_whole_model_timing(monkeypatch):
    """Speed-aware mode times the built model against the original (rankslim.whole_model); in tests that timing is
    the parameter count (ms), so outcomes never depend on the machine's load.  tests/test_whole_model.py replaces
    it per test and keeps a reference to the real function."""
    from rankslim import whole_model

    def by_params(models, example, **kw):
        return [float(sum(p.numel() for p in m.parameters())) for m in models], 1
    monkeypatch.setattr(whole_model, "time_models", by_params)


class TinyNet(nn.Module):
    """A small conv net for 8x8 single-channel inputs (scikit-learn digits), with BN, a grouped conv and an FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(self.dw(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def train_on_digits(net: nn.Module, epochs: int, lr: float = 1e-2, batch: int = 128) -> nn.Module:
    """Train ``net`` on scikit-learn digits (train split) with Adam; seeded by the caller. Returns it in eval mode."""
    from rankslim.data import load_dataset

    x, y = load_dataset("digits", "train").tensors
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            loss = nn.functional.cross_entropy(net(x[i:i + batch]), y[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()
