"""Save and load compressed models as ``plan + state_dict`` in one safetensors file.

The file holds only tensors and a JSON plan in the safetensors header: opening it never runs
code.  A truncated or corrupt file is refused with :class:`CheckpointError`.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import CheckpointError, ModelSpecError, PlanError
from .plan import Plan, apply_plan, attach_plan, get_plan

#: model specs that name only rankslim's own zoo or torchvision constructors, safe to follow from a file
_SAFE_SPEC_PREFIXES = ("zoo:", "torchvision:")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a compressed ``model`` (from :func:`rankslim.compress`) to ``path`` (a ``.rankslim`` file).

    Written to a temporary file first and renamed, so an interrupted save leaves no half file.
    """
    from safetensors.torch import save_file

    plan = get_plan(model)
    path = Path(path)
    # tied weights share storage and safetensors refuses shared tensors, so every entry is its own copy
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp), metadata={"rankslim_plan": plan.to_json()})
    os.replace(tmp, path)
    return path


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan stored in a rankslim file, without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"no such file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path} is not a readable rankslim file (truncated or corrupt?): {exc}") from exc
    if "rankslim_plan" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without a rankslim plan; was it written by rankslim.save?")
    try:
        return Plan.from_json(meta["rankslim_plan"])
    except PlanError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load(path: str | os.PathLike, model: nn.Module | str | None = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a compressed model from ``path``.

    ``model`` is the original, uncompressed model definition (an ``nn.Module`` whose weights
    will be overwritten, or a model spec).  It may be omitted when the file was made from a
    ``zoo:`` or ``torchvision:`` spec; other specs are not followed from a file, because that
    would import code the file names.
    """
    from safetensors.torch import load_file

    plan = read_plan(path)
    if model is None:
        spec = plan.model_spec
        if not spec or not spec.startswith(_SAFE_SPEC_PREFIXES):
            raise ModelSpecError(
                f"{path} was made from {spec or 'a user model'}; pass the original model definition: "
                "rankslim.load(path, model=MyModel())")
        from .zoo import resolve_model
        model = resolve_model(spec.split("@")[0] if spec.startswith("torchvision:") else spec).model
    elif isinstance(model, str):
        from .zoo import resolve_model
        model = resolve_model(model).model
    try:
        state = load_file(str(path), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc
    apply_plan(model, plan)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model definition given: {exc}") from exc
    attach_plan(model, plan)
    return model.eval()


def is_rankslim_file(path: str | os.PathLike) -> bool:
    """True when ``path`` opens as a safetensors file carrying a rankslim plan."""
    try:
        read_plan(path)
        return True
    except CheckpointError:
        return False


__all__ = ["save", "load", "read_plan", "is_rankslim_file"]
