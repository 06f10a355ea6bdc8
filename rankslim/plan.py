"""Plans: which layer became what, with which ranks — JSON-able, so a compressed model reloads
from ``plan + state_dict`` into the user's own model definition without pickled code.

A plan read from a file is untrusted input: :meth:`Plan.from_json` checks every field's type, and
:func:`check_plan` checks every layer against the model (the layer exists and is of the recorded
type, the method exists, every rank lies in ``[1, max rank]`` of that layer) *before*
:func:`apply_plan` builds a single new layer, so a tampered rank cannot allocate a huge tensor.
:func:`read_plan` and :func:`restore` do the same for a ``.rankslim`` file on disk.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError, PlanError
from .methods import METHODS, get_method
from .surgery import Target, get_submodule, layer_view, replace_modules

PLAN_FORMAT = "rankslim-plan"
PLAN_VERSION = 1

#: key of the plan JSON in the safetensors header of a ``.rankslim`` file
PLAN_METADATA_KEY = "rankslim_plan"

#: layer types a plan may replace (the only ones :func:`rankslim.surgery.select_targets` picks)
_REPLACEABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerPlan:
    """One replaced layer: its dotted ``name``, the ``method`` and the method's ``info`` (ranks, ...)."""

    name: str
    method: str
    info: dict[str, Any]
    original_type: str = ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise PlanError(f"malformed rankslim plan: {what}")


def _layer_from_dict(i: int, d: Any) -> LayerPlan:
    _expect(isinstance(d, dict), f"layer {i} is a {type(d).__name__}, not an object")
    unknown = set(d) - {"name", "method", "info", "original_type"}
    _expect(not unknown, f"layer {i} has unknown fields {sorted(unknown)}")
    _expect(isinstance(d.get("name"), str) and d["name"] != "", f"layer {i} needs a non-empty string 'name'")
    _expect(isinstance(d.get("method"), str), f"layer {d['name']!r} needs a string 'method'")
    _expect(isinstance(d.get("info"), dict), f"layer {d['name']!r} needs an object 'info'")
    _expect(isinstance(d.get("original_type", ""), str), f"layer {d['name']!r}: 'original_type' must be a string")
    return LayerPlan(d["name"], d["method"], d["info"], d.get("original_type", ""))


@dataclass
class Plan:
    """All replaced layers of one compressed model, plus how to rebuild the original model."""

    layers: list[LayerPlan] = field(default_factory=list)
    model_spec: str | None = None
    input_shape: list[int] | None = None
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        """The plan as a JSON string (sorted keys, so equal plans give equal text)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse a plan; :class:`PlanError` unless ``text`` is a well-typed rankslim plan of a known version.

        Every top-level key must be known and of its type (``layers``: list of objects with string
        ``name``/``method``/``original_type`` and an object ``info``; ``model_spec``: string or null;
        ``input_shape``: list of positive ints or null; ``version``: int).  Layer names are unique.
        """
        try:
            d = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise PlanError(f"malformed rankslim plan: not JSON ({exc})") from exc
        _expect(isinstance(d, dict), "the plan is not a JSON object")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError("not a rankslim plan (format field missing)")
        unknown = set(d) - {"layers", "model_spec", "input_shape", "format", "version"}
        _expect(not unknown, f"unknown top-level fields {sorted(unknown)}")
        version = d.get("version", -1)
        _expect(_is_int(version), f"'version' must be an integer, got {version!r}")
        if version > PLAN_VERSION:
            raise PlanError(f"plan version {version} is newer than this rankslim understands ({PLAN_VERSION}); upgrade rankslim")
        layers_raw = d.get("layers", [])
        _expect(isinstance(layers_raw, list), "'layers' must be a list")
        layers = [_layer_from_dict(i, lp) for i, lp in enumerate(layers_raw)]
        names = [lp.name for lp in layers]
        _expect(len(set(names)) == len(names), "a layer is named twice")
        spec = d.get("model_spec")
        _expect(spec is None or isinstance(spec, str), "'model_spec' must be a string or null")
        shape = d.get("input_shape")
        _expect(shape is None or (isinstance(shape, list) and all(_is_int(s) and s > 0 for s in shape)),
                "'input_shape' must be a list of positive integers or null")
        return cls(layers=layers, model_spec=spec, input_shape=shape, format=d["format"], version=version)


# ------------------------------------------------------------------------------------- validation


def _is_rank_key(key: str) -> bool:
    return key in ("rank", "ranks") or key.endswith(("_rank", "_ranks"))


def _check_info(lp: LayerPlan, m: int, k: int, bound: int) -> None:
    """Generic checks of ``lp.info`` for a layer whose matrix view is ``(m, k)``; ``bound``: its largest rank.

    Rank-named values (``rank``, ``ranks``, ``*_rank``, ``*_ranks``) must be numbers in ``[1, bound]``
    (``ranks`` lists may hold ``null`` for a mode left uncompressed, and a string ``ranks`` is a
    display label).  ``*_rank`` may also be 0, or a fraction (``lam_rank`` is a threshold): a
    low-rank part of rank 0 is an L + S layer whose sparse part carries everything.
    ``out_factors`` / ``in_factors`` must be positive integers multiplying to ``m`` / ``k``.
    """
    where = f"layer {lp.name!r} ({lp.method})"
    for key, v in lp.info.items():
        if _is_rank_key(key):
            if key.endswith("ranks") and isinstance(v, str):
                continue
            lo = 0 if key.endswith("_rank") else 1
            for x in (v if isinstance(v, list) else [v]):
                if x is None and isinstance(v, list):
                    continue
                if not (_is_int(x) or isinstance(x, float)):
                    raise PlanError(f"{where}: {key} must hold numbers, got {x!r}")
                if not lo <= x <= bound:  # NaN fails too
                    raise PlanError(f"{where}: {key} = {x} is impossible for a {m}x{k} layer (allowed: {lo}..{bound}); "
                                    "the file was altered or made for another model")
        elif key in ("out_factors", "in_factors"):
            size = m if key == "out_factors" else k
            if not (isinstance(v, list) and v and all(_is_int(x) and x >= 1 for x in v) and math.prod(v) == size):
                raise PlanError(f"{where}: {key} = {v!r} must be positive integers multiplying to {size}")


def check_plan(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """Check every layer of ``plan`` against ``model`` without changing or allocating anything.

    Returns ``{name: current module}``.  Raises :class:`PlanError` when a layer is missing, of
    another type than recorded, not a Linear/Conv2d, names an unknown method, or holds a rank
    outside ``[1, max(min(m, k), method.max_rank)]`` (``m x k`` the layer's matrix view).
    """
    found: dict[str, nn.Module] = {}
    for lp in plan.layers:
        mod = get_submodule(model, lp.name)
        if lp.original_type and type(mod).__name__ != lp.original_type:
            raise PlanError(f"layer {lp.name!r} is a {type(mod).__name__} but the plan was made for a {lp.original_type}; "
                            "load into the same model definition that was compressed")
        view = layer_view(mod)  # Conv1d, GPT-2 Conv1D and Conv2d/Linear subclasses are seen as plain layers
        if view is None:
            raise PlanError(f"layer {lp.name!r} is a {type(mod).__name__}; a plan only replaces Linear and Conv2d layers "
                            "(and Conv1d, GPT-2 Conv1D, their subclasses)")
        if lp.method not in METHODS:
            raise PlanError(f"layer {lp.name!r} names an unknown method {lp.method!r}; available: {', '.join(sorted(METHODS))}")
        mod = view.module
        m, k = int(mod.weight.shape[0]), int(mod.weight[0].numel())
        kind = view.kind
        # max_rank reads only the module (no traced shapes); a method's knob may exceed min(m, k) (CP)
        try:
            bound = max(min(m, k), int(get_method(lp.method).max_rank(Target(lp.name, mod, kind, (), ()))))
        except Exception:  # a method that cannot size this layer at all: fall back to the matrix rank
            bound = min(m, k)
        _check_info(lp, m, k, bound)
        found[lp.name] = view.original
    return found


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace, in place, every layer named in ``plan`` by an uninitialised layer of the planned shape.

    The whole plan is checked first (:func:`check_plan`), so a refused plan leaves ``model``
    unchanged.  Load the compressed ``state_dict`` afterwards.  Raises :class:`PlanError`.
    """
    found = check_plan(model, plan)
    new: dict[str, nn.Module] = {}
    for lp in plan.layers:
        try:
            view = layer_view(found[lp.name])
            new[lp.name] = view.wrap(get_method(lp.method).structure(view.module, lp.info))
        except PlanError:
            raise
        except Exception as exc:  # a value of the wrong shape that the generic checks let through
            raise PlanError(f"layer {lp.name!r}: cannot build a {lp.method} layer from info {lp.info!r}: {exc}") from exc
    return replace_modules(model, new)


def get_plan(model: nn.Module) -> Plan:
    """The plan attached to a model returned by :func:`rankslim.compress` or :func:`rankslim.load`."""
    plan = getattr(model, "_rankslim_plan", None)
    if plan is None:
        raise PlanError("this model carries no rankslim plan: pass a model returned by rankslim.compress() or rankslim.load()")
    return plan


def attach_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Attach ``plan`` to ``model`` (a plain attribute: survives deepcopy and pickling)."""
    model._rankslim_plan = plan  # type: ignore[attr-defined]
    return model


# ------------------------------------------------------------------------------------ rankslim files


def _header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Metadata and ``{tensor name: shape}`` of a safetensors file, without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"no such file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path} is not a readable rankslim file (truncated or corrupt?): {exc}") from exc
    return meta, shapes


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan stored in a rankslim file (checked as :meth:`Plan.from_json` does), without loading its tensors.

    :class:`CheckpointError` for a missing, damaged or non-rankslim file or a malformed plan.
    """
    return _plan_from(path, _header(path)[0])


def _plan_from(path: str | os.PathLike, meta: dict[str, str]) -> Plan:
    if PLAN_METADATA_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file without a rankslim plan; was it written by rankslim.save?")
    try:
        return Plan.from_json(meta[PLAN_METADATA_KEY])
    except PlanError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def restore(path: str | os.PathLike, model: nn.Module, map_location: str = "cpu") -> nn.Module:
    """The compressed model stored in ``path``, rebuilt inside a deep copy of ``model`` (left untouched).

    ``model`` is the original, uncompressed definition.  Order: plan checked against ``model``
    (:func:`check_plan`), structure built in the copy, the file's tensor names and shapes compared
    with that structure, and only then the tensors read and loaded.  Any failure raises
    :class:`CheckpointError` (damaged file, shapes that differ) or :class:`PlanError` (plan that does
    not fit ``model``); ``model`` is never modified.  Returns the rebuilt model in eval mode.
    """
    meta, shapes = _header(path)
    plan = _plan_from(path, meta)
    from .io import unpack_state, unpacked_shapes  # sparse layers stored as values + support (io.save)
    shapes = unpacked_shapes(path, meta, shapes)
    check_plan(model, plan)
    built = apply_plan(copy.deepcopy(model), plan)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k}: file {shapes[k]} vs model {expected[k]}" for k in sorted(set(expected) & set(shapes))
             if shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing tensors {missing[:5]}" if missing else "", f"unexpected tensors {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong[:5]}" if wrong else ""]))
        raise CheckpointError(f"{path} does not match the model definition given ({detail}); "
                              "pass the model definition that was compressed")
    try:
        state = load_file(str(path), device=map_location)
    except Exception as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from exc
    state = unpack_state(path, meta, state)
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match the model definition given: {exc}") from exc
    attach_plan(built, plan)
    return built.eval()


__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PLAN_METADATA_KEY", "LayerPlan", "Plan", "apply_plan", "attach_plan",
           "check_plan", "get_plan", "read_plan", "restore"]
