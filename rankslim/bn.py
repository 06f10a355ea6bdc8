"""BatchNorm re-estimation after compression (the "BN rectification" idea of the LRPET paper, section III-C).

Factorizing a layer shifts the mean and variance of what its BatchNorm sees; re-estimating the running
statistics on a few hundred calibration inputs corrects that shift without any training.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running mean/var and re-estimate them as exact averages over ``batches``.

    ``batches``: model inputs ``(B, *input_shape)``.  Only BN statistics change (no weights, no other
    buffers); the model's train/eval mode is restored.  Returns the number of BN layers updated.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        device = next(model.parameters()).device
        for x in batches:
            model(x.to(device))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return len(bns)
