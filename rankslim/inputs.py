"""Model inputs of any form: one tensor (any dtype: float images, LongTensor token ids), a tuple of
tensors (positional arguments) or a dict of tensors (keyword arguments, Hugging Face style
``input_ids`` / ``attention_mask``).

Every stage of rankslim that runs the user's model goes through :func:`call_model`, so one input
form works everywhere: tracing, MAC counting, head detection, calibration, BatchNorm re-estimation.

Conventions:

* A *batch* is an input whose tensors all share a leading batch dimension (``(B, ...)``).
* An *example* is a batch of one sample (``B = 1``): MACs are counted per sample on it.
* Only floating-point tensors are cast to the model's dtype; integer tensors (token ids, masks)
  keep theirs. All tensors move to the model's device.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .errors import DataError

#: what a model input may be: a tensor, a tuple/list of tensors, or a dict of tensors (values may also be None)
Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


def is_shape(obj: Any) -> bool:
    """True when ``obj`` is a per-sample shape (a tuple/list of ints), not model inputs."""
    return isinstance(obj, (tuple, list, torch.Size)) and all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in obj) and len(obj) > 0


def is_inputs(obj: Any) -> bool:
    """True when ``obj`` is a tensor, or a tuple/list/dict holding at least one tensor."""
    return bool(tensors(obj)) and not is_shape(obj)


def tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x`` (a tensor, tuple/list or dict, nested), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors(v)]
    return []


def map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``x`` with every tensor replaced by ``fn(tensor)``; the structure (tuple, list, dict) is kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(map_tensors(v, fn) for v in x)
    if isinstance(x, list):
        return [map_tensors(v, fn) for v in x]
    return x


def call_model(model: nn.Module, batch: Inputs) -> Any:
    """Run ``model`` on ``batch``: ``model(x)`` for a tensor, ``model(*batch)`` for a tuple/list,
    ``model(**batch)`` for a dict."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def primary(x: Inputs) -> torch.Tensor:
    """The first tensor of ``x`` (``input_ids`` of a dict when present): the one that describes a sample."""
    if isinstance(x, Mapping) and isinstance(x.get("input_ids"), torch.Tensor):
        return x["input_ids"]
    ts = tensors(x)
    if not ts:
        raise DataError(f"model inputs hold no tensor: {describe(x)}")
    return ts[0]


def batch_size(x: Inputs) -> int:
    """Number of samples in the batch ``x`` (the leading dimension of its first tensor; 1 for a 0-d tensor)."""
    t = primary(x)
    return int(t.shape[0]) if t.dim() else 1


def sample_shape(x: Inputs) -> tuple[int, ...]:
    """Per-sample shape of the primary tensor of batch ``x`` (e.g. ``(1, 28, 28)``, or ``(T,)`` for token ids)."""
    return tuple(int(s) for s in primary(x).shape[1:])


def slice_batch(x: Inputs, start: int, stop: int | None = None) -> Inputs:
    """Samples ``start:stop`` of batch ``x``: every tensor with the batch's leading size is sliced, others kept."""
    n = batch_size(x)

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[start:stop] if t.dim() and t.shape[0] == n else t
    return map_tensors(x, cut)


def split_batch(x: Inputs, size: int) -> list[Inputs]:
    """``x`` cut into batches of at most ``size`` samples."""
    n = batch_size(x)
    return [slice_batch(x, s, s + size) for s in range(0, n, size)]


def concat_batches(batches: Sequence[Inputs]) -> Inputs:
    """Batches of one structure joined along the batch dimension (tensors that are not batched are kept from the first)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    sizes = [batch_size(b) for b in batches]
    if isinstance(first, Mapping):
        out = {}
        for k, v in first.items():
            vals = [b[k] for b in batches]
            out[k] = (torch.cat(vals) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == sizes[0]
                      else v)
        return out
    parts = []
    for i, v in enumerate(first):
        vals = [b[i] for b in batches]
        parts.append(torch.cat(vals) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == sizes[0] else v)
    return type(first)(parts) if isinstance(first, list) else tuple(parts)


def stack_samples(items: Sequence[Inputs]) -> Inputs:
    """Per-sample inputs (no batch dimension) of one structure stacked into a batch."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, Mapping):
        return {k: (torch.stack([it[k] for it in items]) if isinstance(v, torch.Tensor) else v)
                for k, v in first.items()}
    return tuple(torch.stack([it[i] for it in items]) if isinstance(v, torch.Tensor) else v
                 for i, v in enumerate(first))


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Device of the model's first parameter/buffer and dtype of its first floating one (``None`` if none)."""
    device, dtype = torch.device("cpu"), None
    ts = [*model.parameters(), *model.buffers()]
    if ts:
        device = ts[0].device
    for t in ts:
        if t.is_floating_point():
            dtype = t.dtype
            break
    return device, dtype


def to_model(x: Inputs, model: nn.Module) -> Inputs:
    """``x`` on the model's device, floating-point tensors cast to the model's dtype (integer ones keep theirs).

    Tensors already right are returned as the same objects.
    """
    device, dtype = model_device_dtype(model)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if t.device != device else t
    return map_tensors(x, move)


def example_from(example_inputs: Inputs | None, input_shape: Iterable[int] | None, model: nn.Module) -> Inputs:
    """The one-sample example MACs are counted on, on the model's device/dtype.

    ``example_inputs`` (a batch; only its first sample is kept) wins over ``input_shape`` (per-sample
    shape: a zero float tensor ``(1, *input_shape)``).  Raises :class:`DataError` when neither is given.
    """
    if example_inputs is not None:
        if not is_inputs(example_inputs):
            raise DataError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
                            f"{describe(example_inputs)}")
        if primary(example_inputs).dim() == 0:
            raise DataError("example_inputs needs a leading batch dimension, e.g. token ids of shape (1, T)")
        return to_model(slice_batch(example_inputs, 0, 1), model)
    if input_shape is None:
        raise DataError("pass input_shape (per-sample, e.g. (3, 224, 224)) or example_inputs (e.g. token ids (1, T))")
    device, dtype = model_device_dtype(model)
    return torch.zeros((1, *tuple(int(s) for s in input_shape)), device=device, dtype=dtype or torch.float32)


def describe(obj: Any) -> str:
    """A short, one-line description of an input (type, dtypes, shapes, keys)."""
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).replace('torch.', '')} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        parts = ", ".join(f"{k!r}: {describe(v)}" if isinstance(v, torch.Tensor) else repr(k) for k in list(obj)[:4]
                          for v in [obj[k]])
        return f"a dict {{{parts}{', ...' if len(obj) > 4 else ''}}}"
    if isinstance(obj, (tuple, list)):
        parts = ", ".join(describe(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in obj[:4])
        return f"a {type(obj).__name__} ({parts}{', ...' if len(obj) > 4 else ''})"
    return f"a {type(obj).__name__}"


def input_description(example: Inputs) -> str:
    """How a MAC figure counted on ``example`` should be read, e.g. ``"per sample of 16 tokens"``."""
    t = primary(example)
    if not t.is_floating_point() and t.dim() == 2:
        return f"per sample (one sequence of {int(t.shape[1])} tokens)"
    return f"per sample of shape {tuple(int(s) for s in t.shape[1:])}"


def tokens_per_sample(example: Inputs) -> int | None:
    """Sequence length of an example of integer token ids ``(1, T)``; ``None`` for other inputs."""
    t = primary(example)
    return int(t.shape[1]) if (not t.is_floating_point() and t.dim() == 2) else None


def load_user_object(spec: str, flag: str) -> Any:
    """What a command-line ``spec`` names: a ``.npy`` file (a tensor; never unpickled), a ``.pt``/``.pth``
    file of tensors (``torch.load(weights_only=True)``: a tensor, tuple, list or dict of tensors), or
    ``package.module:function`` / ``file.py:function`` returning anything (a Dataset, DataLoader, tensor,
    tuple or dict).  ``flag`` names the option in errors (:class:`DataError`).
    """
    from pathlib import Path

    path = Path(spec).expanduser()
    if spec.endswith(".npy"):
        if not path.is_file():
            raise DataError(f"{flag} {spec}: no such file")
        import numpy as np
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise DataError(f"{flag} {spec}: cannot read it as a numpy array ({exc})") from exc
    if spec.endswith((".pt", ".pth")):
        if not path.is_file():
            raise DataError(f"{flag} {spec}: no such file")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{flag} {spec}: not a file of tensors ({str(exc).splitlines()[0] if str(exc) else exc})"
                            ) from exc
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not fn_name.replace(".", "_").isidentifier():
        raise DataError(f"{flag} {spec!r}: expected a .npy or .pt file, or package.module:function / file.py:function")
    from .zoo import _import_from_file, _import_module
    try:
        module = _import_from_file(Path(mod_name).expanduser()) if mod_name.endswith(".py") else _import_module(mod_name)
        fn = module
        for part in fn_name.split("."):
            fn = getattr(fn, part)
    except Exception as exc:
        raise DataError(f"{flag} {spec}: cannot import it ({type(exc).__name__}: {exc})") from exc
    if not callable(fn):
        raise DataError(f"{flag} {spec}: {fn_name} is not callable")
    return fn()


__all__ = ["Inputs", "load_user_object", "batch_size", "call_model", "concat_batches", "describe", "example_from", "input_description",
           "is_inputs", "is_shape", "map_tensors", "model_device_dtype", "primary", "sample_shape", "slice_batch",
           "split_batch", "stack_samples", "tensors", "to_model", "tokens_per_sample"]
