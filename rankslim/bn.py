"""BatchNorm re-estimation after compression (the "BN rectification" idea of the LRPET paper, section III-C).

Factorizing a layer shifts the mean and variance of what its BatchNorm sees; re-estimating the running
statistics on a few hundred calibration inputs corrects that shift without any training.  The estimate
is that of :func:`torch.optim.swa_utils.update_bn` (cumulative averages over every batch), for inputs of
any form (tensor, tuple or dict batches).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import DataError
from .inputs import Inputs, call_model, tensors, to_model


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

    def forward(self, x: Inputs) -> torch.Tensor:
        return call_model(self.inner, x)


def _finite(batches: Iterable, model: nn.Module) -> Iterator[Inputs]:
    """The model inputs of ``batches`` on the model's device/dtype; refuses NaN/Inf.

    A batch is a tensor, a dict of tensors (keyword inputs) or a tuple/list: ``(inputs, labels)``
    pairs give their first element when it is a tensor (the documented form), else the tuple is taken
    as positional inputs.
    """
    for i, b in enumerate(batches):
        # (inputs, labels): labels are one value per sample (B,); positional pairs such as (ids, mask) are (B, T)
        is_pair = (isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], (torch.Tensor, dict))
                   and isinstance(b[1], torch.Tensor) and b[1].dim() == 1)
        x = b[0] if is_pair else b
        if not tensors(x):
            raise DataError(f"calibration batch {i} is a {type(x).__name__}, not a tensor of model inputs")
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors(x)):
            raise DataError(f"calibration batch {i} holds NaN or Inf values; BatchNorm statistics would be "
                            "poisoned. Clean the calibration data first.")
        yield to_model(x, model)


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
    try:
        _update_bn(_finite(batches, model), _OnlyBatchNormTrains(model, bns), bns)
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


def _update_bn(batches: Iterable[Inputs], wrapped: _OnlyBatchNormTrains, bns: list[nn.Module]) -> None:
    """``torch.optim.swa_utils.update_bn`` for inputs of any form: running statistics reset, then
    cumulative averages (``momentum=None``) over every batch; each BN's momentum is restored."""
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    wrapped.train()
    try:
        for x in batches:
            wrapped(x)
    finally:
        for m, mom in momenta.items():
            m.momentum = mom


__all__ = ["recalibrate_bn"]
