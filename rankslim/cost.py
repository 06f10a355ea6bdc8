"""Parameters and multiply-accumulates (MACs) per layer and per model.

Conventions (the same everywhere in rankslim):

* **MACs are per sample**: one forward pass of a single input of the given shape.  A Linear
  applied to ``P`` positions (e.g. tokens) costs ``P * in * out`` MACs; a Conv2d costs
  ``H_out * W_out * C_out * (C_in / groups) * kh * kw``.  Bias additions, BatchNorm and
  activations are not counted, exactly as ``torch.utils.flop_counter.FlopCounterMode`` does
  (which reports FLOPs = 2 x MACs for matmuls and convolutions).
* **Parameters** are stored numbers.  Sparse layers count what a COO format would store: one
  value and one index per non-zero (``2 * nnz``), as the DDLR paper counts them.

Custom rankslim layers describe their own cost through ``rankslim_cost(in_shape, out_shape)``
so the model-wide counter never needs to know every layer type.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import torch
from torch import nn

from .errors import InputShapeError
from .inputs import Inputs, call_model, describe, example_from, is_inputs

#: what the cost functions run the model on: a per-sample shape (zero float input) or example inputs (batch of 1)
ShapeOrExample = Union[tuple[int, ...], Inputs]


@dataclass(frozen=True)
class Cost:
    """Cost of one layer or model: ``params`` (stored numbers) and ``macs`` (per sample)."""

    params: int = 0
    macs: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.macs + other.macs)

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.params - other.params, self.macs - other.macs)

    def get(self, quantity: str) -> int:
        """Return ``params`` or ``macs`` by name."""
        if quantity not in ("params", "macs"):
            raise ValueError(f"unknown cost quantity {quantity!r}; use 'params' or 'macs'")
        return int(getattr(self, quantity))


def _numel_prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def conv2d_macs(conv: nn.Conv2d, out_shape: tuple[int, ...]) -> int:
    """MACs of a Conv2d for one sample whose output is ``out_shape`` = (C_out, H_out, W_out)."""
    c_out, h, w = out_shape[-3:]
    kh, kw = conv.kernel_size
    return int(h * w * c_out * (conv.in_channels // conv.groups) * kh * kw)


def conv1d_macs(conv: nn.Conv1d, out_shape: tuple[int, ...]) -> int:
    """MACs of a Conv1d for one sample whose output is ``out_shape`` = (C_out, L_out)."""
    c_out, length = out_shape[-2:]
    return int(length * c_out * (conv.in_channels // conv.groups) * conv.kernel_size[0])


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 ``Conv1D``: a Linear with a transposed ``weight: (in, out)`` (``y = x W + b``)."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def linear_macs(lin: nn.Linear, out_shape: tuple[int, ...]) -> int:
    """MACs of a Linear for one sample whose output is ``out_shape`` = (..., out_features)."""
    positions = _numel_prod(out_shape[:-1])
    return int(positions * lin.in_features * lin.out_features)


def own_params(module: nn.Module) -> int:
    """Parameters held directly by ``module`` (not its children)."""
    return sum(p.numel() for p in module.parameters(recurse=False))


def leaf_cost(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Cost | None:
    """Cost of one counted module given per-sample input and output shapes (no batch dim).

    Returns ``None`` for modules that the cost model does not count as compute (BN, ReLU, ...);
    their parameters are still counted by :func:`model_cost`.
    """
    custom = getattr(module, "rankslim_cost", None)
    if callable(custom):
        return custom(in_shape, out_shape)
    if isinstance(module, nn.Conv2d):
        return Cost(own_params(module), conv2d_macs(module, out_shape))
    if isinstance(module, nn.Linear):
        return Cost(own_params(module), linear_macs(module, out_shape))
    if isinstance(module, nn.Conv1d):
        return Cost(own_params(module), conv1d_macs(module, out_shape))
    if is_hf_conv1d(module):
        k, m = module.weight.shape
        positions = _numel_prod(out_shape[:-1])
        return Cost(own_params(module), int(positions * k * m))
    return None


@dataclass
class LayerShapes:
    """Per-sample input/output shapes of every module seen in one traced forward pass.

    ``inputs``/``outputs`` hold the shapes of a module's FIRST call.  A module called several times
    in one forward pass (weight reuse, recurrence) has one ``(in_shape, out_shape)`` entry per call
    in ``calls``, so its MACs can be counted for every call.  A module registered under several
    names is traced once, under the first name ``named_modules()`` gives it.
    """

    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calls: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = field(default_factory=dict)
    #: first-call ``(input, output)`` tensors (batch of 1) of layers whose replacement must be verified
    #: (subclasses, Conv1d, GPT-2 Conv1D: see :func:`rankslim.surgery.layer_view`)
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def n_calls(self, name: str) -> int:
        """How many times module ``name`` ran in the traced forward pass (0 if never)."""
        return len(self.calls.get(name, ()))

    def varying(self, name: str) -> bool:
        """True when module ``name`` was called with different input or output shapes."""
        return len(set(self.calls.get(name, ()))) > 1


def make_input(input_shape: ShapeOrExample, batch: int = 1, model: nn.Module | None = None) -> Inputs:
    """A zero input of shape ``(batch, *input_shape)`` on the model's device and dtype.

    ``input_shape`` may instead be example inputs (a tensor of any dtype, tuple or dict of tensors,
    batch of 1): they are returned on the model's device (floating tensors in its dtype).
    """
    if is_inputs(input_shape):
        return example_from(input_shape, None, model) if model is not None else input_shape
    device, dtype = torch.device("cpu"), torch.float32
    if model is not None:
        p = next(iter(model.parameters()), None)
        if p is not None:
            device = p.device
            dtype = p.dtype if p.is_floating_point() else dtype
    return torch.zeros((batch, *input_shape), device=device, dtype=dtype)


@contextlib.contextmanager
def no_fused_attention() -> Iterator[None]:
    """Turn off PyTorch's fused transformer fast path (``torch.backends.mha``) for the duration.

    In eval mode ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` may run one fused kernel
    that never calls their Linear children and that ``FlopCounterMode`` does not see; costs are
    counted on the standard path, which computes the same function.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _needs_sample(module: nn.Module) -> bool:
    """Layers whose rebuilt form is verified on the traced inputs: subclasses, Conv1d and GPT-2 Conv1D."""
    return (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and type(module) not in (nn.Linear, nn.Conv2d)) \
        or is_hf_conv1d(module)


def _describe_input(input_shape: ShapeOrExample) -> str:
    if is_inputs(input_shape):
        return describe(input_shape)
    return f"an input of shape (1, {', '.join(map(str, input_shape))})"


def trace_shapes(model: nn.Module, input_shape: ShapeOrExample) -> LayerShapes:
    """Run one sample through ``model`` (eval mode, no grad) and record every module's shapes.

    ``input_shape``: the per-sample shape (a zero float input is used) or example inputs (a batch of
    one: tensor of any dtype, tuple or dict of tensors).  ``inputs``/``outputs`` keep the first call's
    shapes; every call (modules reused in a forward pass run several times) is listed in ``calls``;
    ``samples`` keeps the tensors of layers whose replacement is verified.  The model's train/eval
    mode is restored afterwards.
    """
    shapes = LayerShapes()
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, args, out) -> None:
            i = tuple(args[0].shape[1:]) if args and isinstance(args[0], torch.Tensor) else ()
            o = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
            shapes.calls.setdefault(name, []).append((i, o))
            if name in shapes.inputs or name in shapes.outputs:
                return
            if (_needs_sample(mod) and len(args) == 1 and isinstance(args[0], torch.Tensor)
                    and isinstance(out, torch.Tensor)):
                shapes.samples[name] = (args[0].detach().clone(), out.detach().clone())
            if args and isinstance(args[0], torch.Tensor):
                shapes.inputs[name] = i
            if isinstance(out, torch.Tensor):
                shapes.outputs[name] = o
        return fn

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_fused_attention():
            call_model(model, make_input(_shape_or_example(input_shape), 1, model))
    except Exception as exc:  # the model's own error is the most useful message
        hint = ("Pass the per-sample input shape the model expects (e.g. --input-shape 3,224,224), or example "
                "inputs (example_inputs=token_ids of shape (1, T), a tuple or a dict) for models that take "
                "token ids or several inputs.")
        raise InputShapeError(f"the model failed on {_describe_input(input_shape)}: {exc}. {hint}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def _counted_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Modules whose compute is counted, outermost first; children of a custom-cost module are skipped."""
    skip_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if callable(getattr(mod, "rankslim_cost", None)):
            skip_prefixes.append(name + "." if name else "")
            yield name, mod
        elif isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d)) or is_hf_conv1d(mod):
            yield name, mod


@dataclass
class ModelCost:
    """Model-wide cost: ``total`` and the per-layer costs of every counted layer."""

    total: Cost
    layers: dict[str, Cost]


def _shape_or_example(x: ShapeOrExample) -> ShapeOrExample:
    return x if is_inputs(x) else tuple(int(s) for s in x)


def model_cost(model: nn.Module, input_shape: ShapeOrExample, shapes: LayerShapes | None = None) -> ModelCost:
    """Parameters and MACs of ``model`` for one sample of ``input_shape`` (no batch dim), or on example
    inputs (a batch of one; see :func:`trace_shapes`).

    Parameters count every parameter object of the model once, however many modules or names
    share it (as ``model.parameters()`` does); custom sparse layers count COO storage.  MACs count
    Conv2d, Linear and every rankslim layer, once per call: a module run twice in the forward pass
    costs twice its MACs (``layers[name].macs`` is that sum).  Layers never called in the traced
    forward pass contribute parameters but no MACs.
    """
    shapes = shapes or trace_shapes(model, input_shape)
    layers: dict[str, Cost] = {}
    counted_param_ids: set[int] = set()
    total_macs = 0
    custom_params = 0
    for name, mod in _counted_modules(model):
        if name not in shapes.outputs:
            continue
        c = leaf_cost(mod, shapes.inputs[name], shapes.outputs[name])
        if c is None:
            continue
        # a reused module costs MACs on every call, with that call's shapes
        per_call = shapes.calls.get(name) or [(shapes.inputs[name], shapes.outputs[name])]
        macs = c.macs + sum(leaf_cost(mod, i, o).macs for i, o in per_call[1:])  # type: ignore[union-attr]
        c = Cost(c.params, macs)
        layers[name] = c
        total_macs += c.macs
        if callable(getattr(mod, "rankslim_cost", None)):
            ids = {id(p) for p in mod.parameters()}
            if ids & counted_param_ids:
                # a custom layer sharing parameters with another custom layer: count plain numel once
                continue
            # custom layers may count storage differently from numel (sparse COO)
            custom_params += c.params
            counted_param_ids.update(ids)
    # model.parameters() yields each Parameter object once, so tied weights are counted once
    plain = sum(p.numel() for p in model.parameters() if id(p) not in counted_param_ids)
    return ModelCost(Cost(plain + custom_params, total_macs), layers)


def flop_counter_macs(model: nn.Module, input_shape: ShapeOrExample) -> int:
    """MACs per sample as ``torch.utils.flop_counter.FlopCounterMode`` counts them (FLOPs / 2), on a
    zero input of the per-sample ``input_shape`` or on example inputs (batch of one).

    PyTorch's fused transformer fast path is off meanwhile (:func:`no_fused_attention`): the counter
    does not see inside it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_fused_attention(), FlopCounterMode(display=False) as fc:
            call_model(model, make_input(_shape_or_example(input_shape), 1, model))
    except Exception as exc:
        raise InputShapeError(f"the model failed on {_describe_input(input_shape)}: {exc}") from exc
    finally:
        model.train(was_training)
    return int(fc.get_total_flops() // 2)
