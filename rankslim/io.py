"""Save and load compressed models as ``plan + state_dict`` in one safetensors file.

The file holds only tensors and a JSON plan in the safetensors header: opening it never runs
code.  A truncated, corrupt or tampered file is refused with :class:`CheckpointError` or
:class:`PlanError` before any layer is built (see :func:`rankslim.plan.restore`).

Sparse (masked) layers are stored compressed: instead of the dense ``weight`` and the boolean ``mask``
(5 bytes per entry in float32, more than the dense layer), the file holds the kept values
(``<layer>.weight.sparse_values``, in the weight's dtype) and the support, either as a bit mask
(``<layer>.mask.sparse_bits``, uint8, 1 bit per entry, little-endian bit order) or as sorted flat int32
indices (``<layer>.mask.sparse_index``), whichever is smaller; the header's ``rankslim_sparse`` metadata
(JSON ``{layer: {"shape": [...], "encoding": "bits" | "index"}}``) says which.  :func:`load` rebuilds the
dense ``weight`` (zero outside the mask, exactly what the layer's forward pass uses) and ``mask``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError
from .plan import PLAN_METADATA_KEY, get_plan, read_plan, restore
from .zoo import plan_base_model, resolve_model


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a compressed ``model`` (from :func:`rankslim.compress`) to ``path`` (a ``.rankslim`` file).

    Written to a temporary file first and renamed, so an interrupted save leaves no half file.
    """
    plan = get_plan(model)
    path = Path(path)
    # tied weights share storage and safetensors refuses shared tensors, so every entry is its own copy
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    state, sparse = pack_sparse(model, state)
    metadata = {PLAN_METADATA_KEY: plan.to_json()}
    if sparse:
        metadata[SPARSE_METADATA_KEY] = json.dumps(sparse, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, model: nn.Module | str | None = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a compressed model from ``path``; returns a new module in eval mode.

    ``model`` is the original, uncompressed model definition: an ``nn.Module`` (deep-copied, never
    modified, also when loading fails) or a model spec (see :func:`rankslim.zoo.resolve_model`).  It
    may be omitted when the file was made from a ``zoo:`` or ``torchvision:`` spec; other specs are
    not followed from a file, because that would import code the file names.
    """
    plan = read_plan(path)
    if model is None:
        model = plan_base_model(plan, path)
    elif isinstance(model, (str, os.PathLike)):
        model = resolve_model(model).model
    return restore(path, model, map_location=map_location)


# ------------------------------------------------------------------------------ compressed sparse layers

#: header metadata key listing the sparse layers stored as values + support (see the module docstring)
SPARSE_METADATA_KEY = "rankslim_sparse"
_VALUES, _BITS, _INDEX = ".weight.sparse_values", ".mask.sparse_bits", ".mask.sparse_index"


def _masked_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of every masked (sparse) layer, aliases included."""
    from .layers.sparse import _Masked
    return [name for name, mod in model.named_modules(remove_duplicate=False) if isinstance(mod, _Masked)]


def pack_sparse(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Replace each masked layer's dense ``weight`` + ``mask`` in ``state`` by its kept values and support.

    Returns the new state (other tensors untouched) and the ``rankslim_sparse`` metadata
    ``{prefix: {"shape": weight shape, "encoding": "bits" | "index"}}``.  The support is a bit mask
    (``numel / 8`` bytes) or int32 flat indices (``4 nnz`` bytes), whichever is smaller.
    """
    out = dict(state)
    meta: dict[str, Any] = {}
    for prefix in _masked_prefixes(model):
        wk, mk = f"{prefix}.weight", f"{prefix}.mask"
        new_keys = (prefix + _VALUES, prefix + _BITS, prefix + _INDEX)
        if wk not in out or mk not in out or any(k in state for k in new_keys) or out[wk].numel() >= 2 ** 31:
            continue
        w, m = out.pop(wk), out.pop(mk).to(torch.bool)
        flat = m.reshape(-1)
        nnz = int(flat.sum())
        out[prefix + _VALUES] = w.reshape(-1)[flat].contiguous()
        if math.ceil(flat.numel() / 8) <= 4 * nnz:
            padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8)
            padded[: flat.numel()] = flat.to(torch.uint8)
            weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
            out[prefix + _BITS] = (padded.reshape(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)
            encoding = "bits"
        else:
            out[prefix + _INDEX] = torch.nonzero(flat).reshape(-1).to(torch.int32)
            encoding = "index"
        meta[prefix] = {"shape": list(w.shape), "encoding": encoding}
    return out, meta


def _sparse_meta(path: str | os.PathLike, meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The file's ``rankslim_sparse`` entries, type-checked (untrusted input)."""
    text = meta.get(SPARSE_METADATA_KEY)
    if text is None:
        return {}
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: malformed {SPARSE_METADATA_KEY} metadata ({exc})") from exc
    ok = isinstance(d, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and set(v) == {"shape", "encoding"}
        and v["encoding"] in ("bits", "index") and isinstance(v["shape"], list) and v["shape"]
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v["shape"])
        for k, v in d.items())
    if not ok:
        raise CheckpointError(f"{path}: malformed {SPARSE_METADATA_KEY} metadata; the file was altered")
    return d


def unpacked_shapes(path: str | os.PathLike, meta: Mapping[str, str],
                    shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the file as the model sees them: packed sparse layers as dense ``weight`` + ``mask``.

    Only the header is read; the packed tensors' sizes are checked against the recorded shape.
    """
    sparse = _sparse_meta(path, meta)
    out = dict(shapes)
    for prefix, info in sparse.items():
        shape = tuple(info["shape"])
        n = math.prod(shape)
        support = prefix + (_BITS if info["encoding"] == "bits" else _INDEX)
        vk = prefix + _VALUES
        if vk not in out or support not in out:
            raise CheckpointError(f"{path}: sparse layer {prefix!r} lacks its stored values or support; "
                                  "the file is damaged")
        vs, ss = out.pop(vk), out.pop(support)
        want_support = (math.ceil(n / 8),) if info["encoding"] == "bits" else vs
        if len(vs) != 1 or vs[0] > n or ss != want_support:
            raise CheckpointError(f"{path}: sparse layer {prefix!r} has inconsistent stored sizes "
                                  f"(values {vs}, support {ss} for a weight of shape {shape})")
        out[f"{prefix}.weight"] = shape
        out[f"{prefix}.mask"] = shape
    return out


def unpack_state(path: str | os.PathLike, meta: Mapping[str, str],
                 state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild the dense ``weight`` (zero outside the support) and boolean ``mask`` of each packed sparse layer."""
    sparse = _sparse_meta(path, meta)
    out = dict(state)
    for prefix, info in sparse.items():
        shape = tuple(info["shape"])
        n = math.prod(shape)
        values = out.pop(prefix + _VALUES)
        dev = values.device
        if info["encoding"] == "bits":
            bits = out.pop(prefix + _BITS)
            if bits.dtype != torch.uint8:
                raise CheckpointError(f"{path}: sparse layer {prefix!r}: support bits must be uint8")
            shifts = torch.arange(8, device=dev, dtype=torch.uint8)
            flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1).to(torch.bool)
            if bool(flat[n:].any()):
                raise CheckpointError(f"{path}: sparse layer {prefix!r}: support bits beyond the weight's size")
            flat = flat[:n].clone()
        else:
            idx = out.pop(prefix + _INDEX)
            if idx.dtype not in (torch.int32, torch.int64) or (idx.numel() and (
                    int(idx.min()) < 0 or int(idx.max()) >= n or bool((idx[1:] <= idx[:-1]).any()))):
                raise CheckpointError(f"{path}: sparse layer {prefix!r}: support indices must be sorted, unique "
                                      f"integers in [0, {n})")
            flat = torch.zeros(n, dtype=torch.bool, device=dev)
            flat[idx.long()] = True
        if int(flat.sum()) != values.numel():
            raise CheckpointError(f"{path}: sparse layer {prefix!r}: {values.numel()} stored values for a support of "
                                  f"{int(flat.sum())} entries; the file is damaged")
        w = torch.zeros(n, dtype=values.dtype, device=dev)
        w[flat] = values
        out[f"{prefix}.weight"] = w.reshape(shape)
        out[f"{prefix}.mask"] = flat.reshape(shape)
    return out


def is_rankslim_file(path: str | os.PathLike) -> bool:
    """True when ``path`` opens as a safetensors file carrying a well-formed rankslim plan."""
    try:
        read_plan(path)
        return True
    except CheckpointError:
        return False


__all__ = ["save", "load", "read_plan", "is_rankslim_file"]
