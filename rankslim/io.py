"""Save and load compressed models as ``plan + state_dict`` in one safetensors file.

The file holds only tensors and a JSON plan in the safetensors header: opening it never runs
code.  A truncated, corrupt or tampered file is refused with :class:`CheckpointError` or
:class:`PlanError` before any layer is built (see :func:`rankslim.plan.restore`).
"""
from __future__ import annotations

import os
from pathlib import Path

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
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp), metadata={PLAN_METADATA_KEY: plan.to_json()})
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


def is_rankslim_file(path: str | os.PathLike) -> bool:
    """True when ``path`` opens as a safetensors file carrying a well-formed rankslim plan."""
    try:
        read_plan(path)
        return True
    except CheckpointError:
        return False


__all__ = ["save", "load", "read_plan", "is_rankslim_file"]
