"""Finding targets and replacing modules: the only place in rankslim that edits a model."""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .cost import Cost, LayerShapes, is_hf_conv1d, leaf_cost
from .errors import InvalidWeightsError, PlanError, UnsupportedLayerError

#: relative max-abs difference allowed between a layer and its full-rank rebuilt view on the traced input
VIEW_TOLERANCE = 1e-4


@dataclass
class LayerView:
    """How rankslim sees a layer: a plain ``nn.Linear`` / ``nn.Conv2d`` (``module``) computing the same function.

    ``adapter``: ``"plain"`` (the layer itself), ``"hf-conv1d"`` (GPT-2 ``Conv1D``: a Linear with
    ``weight.T``), ``"conv1d"`` (``nn.Conv2d`` with a ``1 x k`` kernel) or ``"subclass"`` (the base
    class of a Conv2d/Linear subclass; its own forward is kept by
    :class:`~rankslim.layers.variants.SubclassForward`).  ``wrap`` turns a replacement of the view
    into a replacement of the original; ``prepare`` maps the original's input to the view's input.
    """

    adapter: str
    kind: str
    module: nn.Module
    original: nn.Module
    wrap: Callable[[nn.Module], nn.Module]
    prepare: Callable[[torch.Tensor], torch.Tensor]


def _identity(x):
    return x


def layer_view(mod: nn.Module) -> LayerView | None:
    """The plain Linear/Conv2d view of ``mod`` (see :class:`LayerView`), or ``None`` for other layers.

    Views other than ``"plain"`` hold a copy of the weights; the subclass view is not yet verified
    (:func:`verify_view` checks it on traced inputs).
    """
    from .layers.variants import Conv1dAsConv2d, SubclassForward, layer_input, weightless_copy
    t = type(mod)
    if t in (nn.Linear, nn.Conv2d):
        return LayerView("plain", "linear" if t is nn.Linear else "conv", mod, mod, _identity, _identity)
    w = getattr(mod, "weight", None)
    if is_hf_conv1d(mod):
        k, m = w.shape
        lin = nn.Linear(k, m, bias=getattr(mod, "bias", None) is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.detach().T)
            if lin.bias is not None:
                lin.bias.copy_(mod.bias.detach())
        return LayerView("hf-conv1d", "linear", lin, mod, _identity, _identity)
    if t is nn.Conv1d:
        pad = mod.padding if isinstance(mod.padding, str) else (0, mod.padding[0])
        conv = nn.Conv2d(mod.in_channels, mod.out_channels, (1, mod.kernel_size[0]), stride=(1, mod.stride[0]),
                         padding=pad, dilation=(1, mod.dilation[0]), groups=mod.groups, bias=mod.bias is not None,
                         padding_mode=mod.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w.detach().unsqueeze(2))
            if conv.bias is not None:
                conv.bias.copy_(mod.bias.detach())
        return LayerView("conv1d", "conv", conv, mod, Conv1dAsConv2d, lambda x: x.unsqueeze(-2))
    if isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, nn.Conv1d):
        base = nn.Linear if isinstance(mod, nn.Linear) else nn.Conv2d
        if base is nn.Linear:
            plain: nn.Module = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                         device=w.device, dtype=w.dtype)
        else:
            plain = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                              padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                              bias=mod.bias is not None, padding_mode=mod.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(w.detach())
            if plain.bias is not None:
                plain.bias.copy_(mod.bias.detach())
        template = weightless_copy(mod)
        return LayerView("subclass", "linear" if base is nn.Linear else "conv", plain, mod,
                         lambda layer, tp=template, c=plain: SubclassForward(tp, layer, c),
                         lambda x, tp=template: layer_input(tp, x))
    return None


def verify_view(view: LayerView, x: torch.Tensor, y: torch.Tensor) -> tuple[str | None, tuple, tuple]:
    """Check that the full-rank rebuilt layer ``view.wrap(copy of view.module)`` reproduces the original
    output ``y`` on its traced input ``x`` (a batch of one).

    Returns ``(reason or None, view input shape, view output shape)`` (per sample): the reason says
    what failed, with the measured difference.
    """
    try:
        with torch.no_grad():
            xv = view.prepare(x)
            yv = view.module(xv)
            got = view.wrap(copy.deepcopy(view.module))(x)
    except UnsupportedLayerError as exc:
        return str(exc), (), ()
    except Exception as exc:  # noqa: BLE001 - any failure of the rebuilt layer means "not safe"
        return f"its rebuilt form fails on the traced input ({type(exc).__name__}: {exc})", (), ()
    if not isinstance(got, torch.Tensor) or got.shape != y.shape:
        return (f"its rebuilt form returns shape {tuple(getattr(got, 'shape', ()))}, the original "
                f"{tuple(y.shape)}"), (), ()
    diff = float((got.double() - y.double()).abs().max()) if y.numel() else 0.0
    scale = float(y.double().abs().max()) if y.numel() else 0.0
    if not diff <= VIEW_TOLERANCE * max(scale, 1e-12):
        return (f"at full rank its rebuilt form differs from the original by max |diff| = {diff:.3g} "
                f"(output max {scale:.3g}) on the traced input"), (), ()
    return None, tuple(xv.shape[1:]), tuple(yv.shape[1:])


@dataclass
class Target:
    """One layer to compress.

    ``kind`` is "conv" (``nn.Conv2d``) or "linear" (``nn.Linear``); ``in_shape``/``out_shape`` are
    per-sample shapes from a traced forward pass.  ``matrix`` is the im2col view
    ``W.reshape(out, in * kh * kw)`` for convs and ``(out, in)`` for Linear.

    ``calls`` is how many times the layer runs in one forward pass (every call with the same
    shapes); ``aliases`` are the other names under which the same module object is registered
    (:func:`replace_modules` replaces those too, so they stay shared).
    """

    name: str
    module: nn.Module
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int = 1
    aliases: tuple[str, ...] = ()
    #: how a layer that is not a plain Linear/Conv2d is seen (``module`` is then ``view.module``)
    view: LayerView | None = None

    @property
    def type_name(self) -> str:
        """Class name of the ORIGINAL layer (``Conv1D``, ``Conv1d``, ``Conv2dSame``, ``Linear``, ...)."""
        return type(self.view.original if self.view is not None else self.module).__name__

    def wrap(self, layer: nn.Module) -> nn.Module:
        """A replacement of the view (``layer``) turned into a replacement of the original layer."""
        return self.view.wrap(layer) if self.view is not None else layer

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The original layer's input ``x`` mapped to the input of ``module`` (the view), for calibration."""
        return self.view.prepare(x) if self.view is not None else x

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
        """Parameters and MACs of ONE call of the dense layer (like every ``Method.cost``); see :meth:`per_sample`."""
        c = leaf_cost(self.module, self.in_shape, self.out_shape)
        assert c is not None
        return c

    def per_sample(self, per_call: Cost) -> Cost:
        """A per-call cost (``dense_cost``, ``Method.cost``) turned into the cost per sample: MACs times ``calls``.

        Parameters are stored once however often the layer runs.
        """
        return Cost(per_call.params, per_call.macs * self.calls)

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

    A layer is a target when it is an ``nn.Linear``, an ungrouped ``nn.Conv2d`` / ``nn.Conv1d``, a
    GPT-2 ``Conv1D`` or a Conv2d/Linear subclass whose view (:func:`layer_view`) reproduces its
    output on the traced input at full rank (else skipped with the measured reason), that matches
    one ``include`` glob (all, when ``include`` is empty), matches no ``exclude`` glob, holds at
    least ``min_params`` weights and runs in the traced forward pass.  Other leaf layers with
    parameters are reported as skipped (unsupported type).  ``keep_stem`` leaves convs that read
    the image itself (at most 3 input channels) dense: they hold a tiny share of the cost but a
    low-rank stem ruins accuracy (see docs/results/decompositions.md).

    Shared layers (see docs/getting-started.md, "Shared and tied layers"): a module registered
    under several names is a target once, under its first name, and each other name is listed as
    skipped ("alias of ..."); a layer called several times per forward pass is a target whose
    ``calls`` counts them, unless the calls see different shapes (skipped); a layer holding a
    Parameter that another layer also holds (``b.weight = a.weight``, tied embeddings) is skipped
    ("weight tied with ..."), because replacing it would untie the two.
    """
    include = list(include or [])
    targets: list[Target] = []
    skipped: list[Skipped] = []
    first_name: dict[int, str] = {}
    names_of: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)
    tied = _tied_parameters(model)
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        tname = type(mod).__name__
        if id(mod) in first_name:
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d)) or is_hf_conv1d(mod):
                first = first_name[id(mod)]
                skipped.append(Skipped(name, tname, f"alias of {first!r} (the same module object): handled once "
                                                    f"under {first!r}, and a replacement replaces both names"))
            continue
        first_name[id(mod)] = name
        is_candidate = (type(mod) in (nn.Conv2d, nn.Linear, nn.Conv1d) or is_hf_conv1d(mod)
                        or (isinstance(mod, (nn.Conv2d, nn.Linear)) and not isinstance(mod, nn.Conv1d)))
        if not is_candidate:
            if isinstance(mod, nn.Conv1d):
                skipped.append(Skipped(name, tname, f"{tname} subclasses Conv1d: only plain Conv1d is supported"))
            # only report leaves that actually hold weights: containers and BN are not of interest
            elif (isinstance(mod, (nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, nn.MultiheadAttention))
                    or (not list(mod.children()) and own_weight(mod) and not isinstance(mod, _NORM_TYPES))):
                skipped.append(Skipped(name, tname, f"unsupported layer type {tname}"))
            continue
        if include and not _matches(name, include):
            continue
        if _matches(name, exclude):
            skipped.append(Skipped(name, tname, "excluded by name pattern"))
            continue
        if isinstance(mod, (nn.Conv2d, nn.Conv1d)) and mod.groups != 1:
            why = "depthwise" if mod.groups == mod.in_channels else f"grouped (groups={mod.groups})"
            skipped.append(Skipped(name, tname, f"{why} convolution: no channel decomposition"))
            continue
        ties = tied.get(name)
        if ties:
            skipped.append(Skipped(name, tname, "; ".join(f"{p} tied with {other}" for p, other in ties)
                                   + ": decomposing one would untie them, so both stay dense"))
            continue
        if keep_stem and isinstance(mod, (nn.Conv2d, nn.Conv1d)) and mod.in_channels <= 3:
            skipped.append(Skipped(name, tname, "stem conv (<= 3 input channels) kept dense (keep_stem=True)"))
            continue
        if mod.weight.numel() < min_params:
            skipped.append(Skipped(name, tname, f"smaller than min_params={min_params}"))
            continue
        if name not in shapes.outputs:
            skipped.append(Skipped(name, tname, "not called in the forward pass"))
            continue
        calls = shapes.calls.get(name, [])
        if len(set(calls)) > 1:
            seen_shapes = ", ".join(str(i) for i in dict.fromkeys(i for i, _ in calls))
            skipped.append(Skipped(name, tname, f"called {len(calls)} times per forward pass with different shapes "
                                                f"(inputs {seen_shapes}): one factorization is costed at one shape"))
            continue
        aliases = tuple(n for n in names_of[id(mod)] if n != name)
        n_calls = max(1, len(calls))
        if type(mod) in (nn.Conv2d, nn.Linear):
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            targets.append(Target(name, mod, kind, shapes.inputs[name], shapes.outputs[name], n_calls, aliases))
            continue
        # a variant: decomposed through its plain view, verified on the traced input at full rank
        try:
            view = layer_view(mod)
        except UnsupportedLayerError as exc:
            skipped.append(Skipped(name, tname, str(exc)))
            continue
        sample = shapes.samples.get(name)
        if view is None or sample is None:
            skipped.append(Skipped(name, tname, f"{tname}: its forward could not be traced with one tensor input, "
                                                "so its factorized form cannot be verified"))
            continue
        why, vin, vout = verify_view(view, *sample)
        if why:
            skipped.append(Skipped(name, tname, f"{tname} ({view.adapter}) not replaced: {why}"))
            continue
        targets.append(Target(name, view.module, view.kind, vin, vout, n_calls, aliases, view))
    return targets, skipped


def _tied_parameters(model: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """``{module name: [(param name, "other_module.param"), ...]}`` for parameters held by more than one module.

    Modules are taken once each (aliases of one module object are not ties); a parameter tied
    with several modules lists each of them.
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((mname, pname))
    out: dict[str, list[tuple[str, str]]] = {}
    for hs in holders.values():
        if len({m for m, _ in hs}) < 2:
            continue
        for mname, pname in hs:
            others = [f"{m}.{p}" if m else p for m, p in hs if m != mname]
            out.setdefault(mname, []).extend((pname, o) for o in others)
    return out


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


def module_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted name under which ``module`` (this very object) is registered in ``model``, in registration order."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


def replace_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Swap each dotted name in ``replacements`` for its new module, in place; returns ``model``.

    Every other name that refers to the same module object (an alias such as ``self.b = self.a``)
    gets the same new module too, so layers shared by identity stay shared.  Raises
    :class:`PlanError` when a name is missing.
    """
    for name, new in replacements.items():
        old = get_submodule(model, name)  # raise a clear error if the layer is missing
        for alias in module_names(model, old) or [name]:
            parent_name, _, child = alias.rpartition(".")
            parent = get_submodule(model, parent_name) if parent_name else model
            setattr(parent, child, new)
    return model


def working_copy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model itself when ``inplace``, otherwise a deep copy (the user's model stays untouched)."""
    return model if inplace else copy.deepcopy(model)
