"""Finding targets and replacing modules: the only place in rankslim that edits a model."""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from .cost import Cost, LayerShapes, leaf_cost
from .errors import InvalidWeightsError, PlanError


@dataclass
class Target:
    """One layer to compress.

    ``kind`` is "conv" (``nn.Conv2d``) or "linear" (``nn.Linear``); ``in_shape``/``out_shape`` are
    per-sample shapes from a traced forward pass.  ``matrix`` is the im2col view
    ``W.reshape(out, in * kh * kw)`` for convs and ``(out, in)`` for Linear.
    """

    name: str
    module: nn.Module
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def matrix(self) -> torch.Tensor:
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        w = self.module.weight
        return int(w.shape[0]), int(w[0].numel())

    @property
    def full_rank(self) -> int:
        return min(self.matrix_shape)

    @property
    def positions(self) -> int:
        """Output positions per sample: ``H_out * W_out`` for convs, tokens for Linear."""
        if self.kind == "conv":
            return int(self.out_shape[-1] * self.out_shape[-2])
        n = 1
        for s in self.out_shape[:-1]:
            n *= int(s)
        return n

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def dense_cost(self) -> Cost:
        c = leaf_cost(self.module, self.in_shape, self.out_shape)
        assert c is not None
        return c

    def describe_shape(self) -> str:
        """Human-readable weight shape, e.g. ``64x64x3x3`` or ``512x10``."""
        return "x".join(str(s) for s in self.module.weight.shape)


@dataclass
class Skipped:
    """A layer that was looked at and left alone, with the reason."""

    name: str
    type: str
    reason: str


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in (patterns or []))


def select_targets(
    model: nn.Module,
    shapes: LayerShapes,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_params: int = 0,
    keep_stem: bool = False,
) -> tuple[list[Target], list[Skipped]]:
    """Targets in forward (module registration) order, and every skipped layer with its reason.

    A layer is a target when it is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` that matches
    one ``include`` glob (all, when ``include`` is empty), matches no ``exclude`` glob, holds at
    least ``min_params`` weights and runs in the traced forward pass.  Other leaf layers with
    parameters are reported as skipped (unsupported type).  ``keep_stem`` leaves convs that read
    the image itself (at most 3 input channels) dense: they hold a tiny share of the cost but a
    low-rank stem ruins accuracy (see docs/results/decompositions.md).
    """
    include = list(include or [])
    targets: list[Target] = []
    skipped: list[Skipped] = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not name:
            continue
        tname = type(mod).__name__
        is_candidate = isinstance(mod, (nn.Conv2d, nn.Linear)) and type(mod) in (nn.Conv2d, nn.Linear)
        if not is_candidate:
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                # subclasses may use their weight outside forward (MultiheadAttention's out_proj does)
                skipped.append(Skipped(name, tname, f"{tname} subclasses {type(mod).__mro__[1].__name__}; "
                                                    "its weight may be used outside forward(), so it is left alone"))
            # only report leaves that actually hold weights: containers and BN are not of interest
            elif (isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, nn.MultiheadAttention))
                    or (not list(mod.children()) and own_weight(mod) and not isinstance(mod, _NORM_TYPES))):
                skipped.append(Skipped(name, tname, f"unsupported layer type {tname}"))
            continue
        if include and not _matches(name, include):
            continue
        if _matches(name, exclude):
            skipped.append(Skipped(name, tname, "excluded by name pattern"))
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            why = "depthwise" if mod.groups == mod.in_channels else f"grouped (groups={mod.groups})"
            skipped.append(Skipped(name, tname, f"{why} convolution: no channel decomposition"))
            continue
        if id(mod) in seen:
            skipped.append(Skipped(name, tname, "module is shared with another name"))
            continue
        seen.add(id(mod))
        if keep_stem and isinstance(mod, nn.Conv2d) and mod.in_channels <= 3:
            skipped.append(Skipped(name, tname, "stem conv (<= 3 input channels) kept dense (keep_stem=True)"))
            continue
        if mod.weight.numel() < min_params:
            skipped.append(Skipped(name, tname, f"smaller than min_params={min_params}"))
            continue
        if name not in shapes.outputs:
            skipped.append(Skipped(name, tname, "not called in the forward pass"))
            continue
        kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
        targets.append(Target(name, mod, kind, shapes.inputs[name], shapes.outputs[name]))
    return targets, skipped


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
               nn.InstanceNorm2d, nn.LocalResponseNorm)


def own_weight(mod: nn.Module) -> bool:
    """True when the module holds a ``weight`` parameter of its own."""
    return isinstance(getattr(mod, "weight", None), nn.Parameter)


def check_finite(model: nn.Module) -> None:
    """Raise :class:`InvalidWeightsError` naming the first parameter or buffer holding NaN/Inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise InvalidWeightsError(
                    f"{kind} {name!r} holds {bad} NaN/Inf value(s); rankslim refuses to compress a model "
                    "with non-finite weights. Fix or retrain the model first."
                )


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted ``name``; :class:`PlanError` if there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise PlanError(f"the model has no layer named {name!r}") from exc


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Swap each dotted name in ``replacements`` for its new module, in place; returns ``model``."""
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = get_submodule(model, parent_name) if parent_name else model
        get_submodule(model, name)  # raise a clear error if the layer is missing
        setattr(parent, child, new)
    return model


def working_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model itself when ``inplace``, otherwise a deep copy (the user's model stays untouched)."""
    return model if inplace else copy.deepcopy(model)
