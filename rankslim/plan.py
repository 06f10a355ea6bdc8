"""Plans: which layer became what, with which ranks — JSON-able, so a compressed model reloads
from ``plan + state_dict`` into the user's own model definition without pickled code."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .errors import PlanError

PLAN_FORMAT = "rankslim-plan"
PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One replaced layer: its dotted ``name``, the ``method`` and the method's ``info`` (ranks, ...)."""

    name: str
    method: str
    info: dict[str, Any]
    original_type: str = ""


@dataclass
class Plan:
    """All replaced layers of one compressed model, plus how to rebuild the original model."""

    layers: list[LayerPlan] = field(default_factory=list)
    model_spec: str | None = None
    input_shape: list[int] | None = None
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse a plan; :class:`PlanError` when the text is not a rankslim plan of a known version."""
        try:
            d = json.loads(text)
            if d.get("format") != PLAN_FORMAT:
                raise PlanError("not a rankslim plan (format field missing)")
            if int(d.get("version", -1)) > PLAN_VERSION:
                raise PlanError(f"plan version {d['version']} is newer than this rankslim understands ({PLAN_VERSION}); upgrade rankslim")
            layers = [LayerPlan(**lp) for lp in d.get("layers", [])]
            return cls(layers=layers, model_spec=d.get("model_spec"), input_shape=d.get("input_shape"),
                       format=d["format"], version=int(d["version"]))
        except PlanError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise PlanError(f"malformed rankslim plan: {exc}") from exc


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace, in place, every layer named in ``plan`` by an uninitialised layer of the planned shape.

    Load the compressed ``state_dict`` afterwards.  Raises :class:`PlanError` when a named layer is
    missing or of a different type than the plan recorded.
    """
    from .methods import get_method
    from .surgery import get_submodule, replace_modules

    new: dict[str, nn.Module] = {}
    for lp in plan.layers:
        mod = get_submodule(model, lp.name)
        if lp.original_type and type(mod).__name__ != lp.original_type:
            raise PlanError(f"layer {lp.name!r} is a {type(mod).__name__} but the plan was made for a {lp.original_type}; "
                            "load into the same model definition that was compressed")
        new[lp.name] = get_method(lp.method).structure(mod, lp.info)
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
