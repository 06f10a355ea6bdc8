"""BatchNorm re-estimation after compression (the "BN rectification" idea of the LRPET paper, section III-C).

Factorizing a layer shifts the mean and variance of what its BatchNorm sees; re-estimating the running
statistics on a few hundred calibration inputs corrects that shift without any training.  The estimate
itself is :func:`torch.optim.swa_utils.update_bn` (cumulative averages over every batch).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .errors import DataError


class _OnlyBatchNormTrains(nn.Module):
    """Wraps ``model`` so that ``train()`` switches only its BatchNorm layers.

    ``update_bn`` calls ``model.train()`` on the whole model; Dropout (and any other mode-dependent
    layer) must stay in eval mode, or the statistics would be those of a randomly thinned network.
    """

    def __init__(self, model: nn.Module, bns: list[nn.Module]) -> None:
        super().__init__()
        self.inner = model
        self._bns = bns

    def train(self, mode: bool = True) -> "_OnlyBatchNormTrains":
        self.training = mode
        self.inner.eval()
        for m in self._bns:
            m.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _finite(batches: Iterable, device: torch.device) -> Iterator[torch.Tensor]:
    """The model inputs of ``batches`` (a tensor, or the first element of a tuple/list) on ``device``; refuses NaN/Inf."""
    for i, b in enumerate(batches):
        x = b[0] if isinstance(b, (list, tuple)) else b
        if not isinstance(x, torch.Tensor):
            raise DataError(f"calibration batch {i} is a {type(x).__name__}, not a tensor of model inputs")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"calibration batch {i} holds NaN or Inf values; BatchNorm statistics would be "
                            "poisoned. Clean the calibration data first.")
        yield x.to(device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running mean/var and re-estimate them as exact averages over ``batches``.

    ``batches``: model inputs ``(B, *input_shape)`` (or ``(inputs, labels)`` pairs).  Only BN
    statistics change (no weights, no other buffers), the other layers run in eval mode, and each
    module's train/eval mode is restored.  A batch holding NaN/Inf raises :class:`DataError` and
    leaves the BN statistics as they were.  Returns the number of BN layers updated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        update_bn(_finite(batches, device), _OnlyBatchNormTrains(model, bns))
    except BaseException:
        # a refused (or failing) batch part-way through must not leave half-estimated statistics behind
        for m, mom, bufs in saved:
            m.momentum = mom
            for k, v in bufs.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, mode in modes:
            m.training = mode
    return len(bns)


__all__ = ["recalibrate_bn"]
