"""Replacements for layers that are not a plain ``nn.Linear`` / ``nn.Conv2d``.

rankslim decomposes every layer through a *view*: a plain ``nn.Linear`` or ``nn.Conv2d`` computing
the same function (see :func:`rankslim.surgery.layer_view`).  The factorized view becomes a
replacement for the original layer through one of these wrappers:

* :class:`Conv1dAsConv2d` — ``nn.Conv1d`` seen as a ``1 x k`` Conv2d: ``(N, C, L) -> (N, C, 1, L)``.
* :class:`SubclassForward` — a ``Conv2d``/``Linear`` subclass (timm's ``Conv2dSame``, custom
  padding): the subclass's own ``forward`` runs on a weightless copy of the original module, and
  its ``conv2d``/``linear`` call on its weight is answered by the factorized layer.

GPT-2's ``Conv1D`` (``y = x W + b`` with ``W: (in, out)``) needs no wrapper: any Linear-shaped
replacement (``LowRankLinear``, ...) computes the same on ``(..., in)`` inputs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedLayerError


class Conv1dAsConv2d(nn.Module):
    """Runs a Conv2d-shaped ``layer`` (any rankslim replacement of a ``1 x k`` conv) on Conv1d inputs.

    ``x: (N, C, L)`` -> ``layer(x[:, :, None, :])`` ``(N, C_out, 1, L_out)`` -> ``(N, C_out, L_out)``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, C, L) -> (N, C_out, L_out)."""
        return self.layer(x.unsqueeze(-2)).squeeze(-2)


_CONV = {F.conv2d, torch.conv2d}
_LINEAR = {F.linear, torch._C._nn.linear}


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Answer(TorchFunctionMode):
    """While a weightless template runs its own forward: its ``conv2d``/``linear`` call on the sentinel
    weight is answered by ``handler(x, call_kwargs)``; any other use of the sentinel weight or bias
    producing a tensor is refused (the factorized layer cannot stand in for it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, handler) -> None:
        super().__init__()
        self.weight, self.bias, self.handler = weight, bias, handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        uses = any(a is self.weight or (self.bias is not None and a is self.bias) for a in flat)
        if not uses:
            return func(*args, **kwargs)
        if func in _CONV or func in _LINEAR:
            names = (["input", "weight", "bias", "stride", "padding", "dilation", "groups"] if func in _CONV
                     else ["input", "weight", "bias"])
            call = dict(zip(names, args))
            call.update(kwargs)
            if call.get("weight") is self.weight:
                b = call.get("bias")
                if not (b is self.bias or (b is None and self.bias is None)):
                    raise UnsupportedLayerError("its forward passes another bias than its own to "
                                                f"{getattr(func, '__name__', func)}")
                return self.handler(call["input"], call, func in _CONV)
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            raise UnsupportedLayerError(f"its forward reads its weight in {getattr(func, '__name__', str(func))}, "
                                        "not only in its conv2d/linear call: a factorized weight cannot stand in for it")
        return out


class _Captured(Exception):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x


def weightless_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose ``weight``/``bias`` Parameters are replaced by meta-device
    sentinels of the same shape and dtype (no storage); every other attribute is kept."""
    template = copy.deepcopy(module)
    for pname in ("weight", "bias"):
        p = template._parameters.pop(pname, None)
        if p is not None:
            object.__setattr__(template, pname, torch.empty(p.shape, dtype=p.dtype, device="meta"))
    return template


class SubclassForward(nn.Module):
    """A ``Conv2d``/``Linear`` subclass with its weight factorized: the subclass's ``forward`` runs on
    a weightless copy (``template``, not a child module: it holds no parameters), and its
    ``F.conv2d``/``F.linear`` call on its weight is computed by ``layer`` (child), a factorized
    plain Conv2d/Linear of the same hyper-parameters.  Padding, reshapes and anything else the
    subclass does around that call stay as they were.

    Raises :class:`~rankslim.errors.UnsupportedLayerError` when the forward uses its weight in any
    other way, or calls conv2d with other stride/padding/dilation/groups than ``layer`` has.
    """

    def __init__(self, template: nn.Module, layer: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "template", template)
        # hyper-parameters the conv2d call must use: those of the plain view the layer was built from
        self._hyper = ((_pair(conv.stride), _pair(conv.padding) if not isinstance(conv.padding, str) else conv.padding,
                        _pair(conv.dilation), conv.groups) if isinstance(conv, nn.Conv2d) else None)

    def _check(self, call: dict, is_conv: bool) -> None:
        if not is_conv or self._hyper is None:
            return
        got = (_pair(call.get("stride", 1)),
               _pair(call.get("padding", 0)) if not isinstance(call.get("padding", 0), str) else call["padding"],
               _pair(call.get("dilation", 1)), call.get("groups", 1))
        if got != self._hyper:
            raise UnsupportedLayerError(f"its forward calls conv2d with (stride, padding, dilation, groups) = {got}, "
                                        f"not its own {self._hyper}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The subclass's own forward, with the factorized ``layer`` answering its conv2d/linear call."""
        t = self.template

        def answer(x, call, is_conv):
            self._check(call, is_conv)
            return self.layer(x)
        with _Answer(t.weight, getattr(t, "bias", None), answer):
            return type(t).forward(t, *args, **kwargs)

    def layer_input(self, *args: Any) -> torch.Tensor:
        """The input the subclass's forward passes to its conv2d/linear call (calibration columns)."""
        return layer_input(self.template, *args)


def layer_input(template: nn.Module, *args: Any) -> torch.Tensor:
    """Run the weightless ``template``'s forward on ``args`` until its conv2d/linear call; return that call's input."""
    def capture(x, call, is_conv):
        raise _Captured(x)
    try:
        with torch.no_grad(), _Answer(template.weight, getattr(template, "bias", None), capture):
            type(template).forward(template, *args)
    except _Captured as got:
        return got.x
    raise UnsupportedLayerError("its forward never calls conv2d/linear with its weight")


__all__ = ["Conv1dAsConv2d", "SubclassForward", "layer_input", "weightless_copy"]
