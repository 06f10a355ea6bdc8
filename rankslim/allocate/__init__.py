"""Rank allocators: interchangeable strategies over one :class:`CostTable`.

Each entry of :data:`ALLOCATORS` is an :class:`Allocator`: a pure function
``fn(table, budget, [context=...], **options) -> {layer: rank | None}`` plus its declared, typed options
and whether it takes a budget.  ``ALLOCATORS[name].configure(options)`` validates options before any
work starts; calling the configured allocator runs it.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import BudgetError, OptionError
from ..options import Opt, any_, bool_, describe, float_, int_, one_of, optional, validate
from .base import Allocation, AllocationContext, Budget, CostTable, LayerOption, Ranks
from .cobla import cobla_allocate
from .pos import pos_cvx_allocate, pos_greedy_allocate
from .search import bayes_allocate, greedy_sensitivity_allocate
from .signal import gavish_donoho_allocate, vbmf_allocate
from .simple import cptv_allocate, energy_allocate, ratio_allocate


@dataclass
class Allocator:
    """A registered rank allocator with its validated options.

    ``budget``: "required" (meets a params/macs budget), "none" (a rank rule: the budget is only
    checked, see docs/allocation.md) or "own" (``ratio``/``energy``: a per-layer rule with its own value).
    """

    name: str
    fn: Callable[..., Ranks]
    description: str
    budget: str = "required"
    options: tuple[Opt, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        declared = {o.name for o in self.options}
        params = {p for p in inspect.signature(self.fn).parameters} - {"table", "budget", "context"}
        if declared != params:  # a registration bug, caught at import
            raise TypeError(f"allocator {self.name!r} declares {sorted(declared)} but its function takes {sorted(params)}")
        if not self.config:
            self.config = validate(self.options, None, f"allocator {self.name!r}")

    @property
    def needs_context(self) -> bool:
        """True when the allocator evaluates the model (COBLA, searches, rank rules)."""
        return "context" in inspect.signature(self.fn).parameters

    def configure(self, options: Mapping[str, Any] | None = None) -> "Allocator":
        """A copy with ``options`` validated (:class:`~rankslim.errors.OptionError` when unknown or ill-typed)."""
        a = copy.copy(self)
        a.config = validate(self.options, options, f"allocator {self.name!r}")
        return a

    def option_help(self) -> list[str]:
        """One line per declared option."""
        return describe(self.options)

    def __call__(self, table: CostTable, budget: Budget, context: AllocationContext | None = None,
                 **overrides: Any) -> Ranks:
        """Run the allocator on ``table`` under ``budget``; ``overrides`` are validated like options."""
        kwargs = dict(self.config)
        if overrides:
            checked = validate(self.options, overrides, f"allocator {self.name!r}")
            kwargs.update({k: checked[k] for k in overrides})
        if self.needs_context:
            if context is None:
                raise BudgetError(f"the {self.name} allocator evaluates the model: call it through compress()")
            kwargs["context"] = context
        return self.fn(table, budget, **kwargs)


def _seed() -> Opt:
    return Opt("seed", optional(int_), None, "random seed (none: compress's seed)")


_REGISTRY = [
    Allocator("cptv", cptv_allocate, "one shared energy threshold, found by bisection (COBLA eq. 10)",
              options=(Opt("iters", int_, 60, "bisection steps"),)),
    Allocator("pos-greedy", pos_greedy_allocate, "greedy: best energy gained per unit cost (POS)",
              options=(Opt("constraint", optional(one_of("params", "macs")), None,
                           "cost quantity of the greedy measure (none: macs when budgeted, else params)"),)),
    Allocator("pos-cvx", pos_cvx_allocate, "exact multiple-choice knapsack by MILP (HiGHS)",
              options=(Opt("max_candidates", optional(int_), None, "candidate ranks per layer (none: all)"),
                       Opt("time_limit", float_, 120.0, "MILP time limit, seconds"),
                       Opt("mip_rel_gap", float_, 0.0, "MILP relative optimality gap"))),
    Allocator("cobla", cobla_allocate, "SQP (SLSQP) on relaxed singular-value masks (COBLA)",
              options=(Opt("maxiter", int_, 50, "SLSQP iterations in total"),
                       Opt("loss", one_of("auto", "kl", "weights"), "auto", "objective: kl on data, or weights"),
                       Opt("max_vars", optional(int_), 2000, "cap on mask variables (tail masks fixed)"),
                       Opt("rounds", int_, 1, "SQP rounds"),
                       Opt("batches_per_eval", optional(int_), None, "calibration batches per objective evaluation"),
                       Opt("max_tries", int_, 1000, "randomized rounding attempts"),
                       Opt("scale", bool_, True, "return the relaxed masks as singular-value scales"),
                       Opt("rounding_candidates", int_, 1, "feasible roundings compared (1 = the paper)"),
                       Opt("start", one_of("cptv", "uniform"), "cptv", "SQP starting point"),
                       _seed())),
    Allocator("bayes", bayes_allocate, "Bayesian search (Optuna TPE) over per-layer rank ratios",
              options=(Opt("trials", int_, 30, "search trials"),
                       Opt("lam", float_, 1.0, "weight of the cost term"),
                       Opt("min_ratio", float_, 0.05, "smallest rank ratio tried"),
                       Opt("holdout", float_, 0.5, "share of calibration batches held out for scoring"),
                       _seed(),
                       Opt("use_eval_fn", bool_, True, "score with eval_fn when compress() was given one"))),
    Allocator("greedy-sensitivity", greedy_sensitivity_allocate, "per-layer sensitivity sweep, then greedy",
              options=(Opt("candidates", any_, (0.1, 0.25, 0.5, 0.75), "rank ratios probed per layer"),
                       Opt("use_eval_fn", bool_, True, "score with eval_fn when compress() was given one"))),
    Allocator("vbmf", vbmf_allocate, "EVBMF rank of every layer (budget only checked)", budget="none"),
    Allocator("gavish-donoho", gavish_donoho_allocate, "Gavish-Donoho optimal hard threshold (budget only checked)",
              budget="none"),
    Allocator("ratio", ratio_allocate, "rank = ceil(ratio * full rank) everywhere", budget="own",
              options=(Opt("ratio", float_, 1.0, "rank / full rank"),)),
    Allocator("energy", energy_allocate, "smallest rank keeping this share of squared singular values", budget="own",
              options=(Opt("energy", float_, 1.0, "energy fraction kept per layer"),)),
]

#: name -> :class:`Allocator` (unconfigured: ``ALLOCATORS[name].configure(options)`` for a call's copy)
ALLOCATORS: dict[str, Allocator] = {a.name: a for a in _REGISTRY}


def get_allocator(name: str, options: Mapping[str, Any] | None = None) -> Allocator:
    """The allocator called ``name`` configured with ``options``; a clear error for unknown names or options."""
    if name not in ALLOCATORS:
        import difflib
        close = difflib.get_close_matches(str(name), list(ALLOCATORS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"unknown allocator {name!r}{hint}; available: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name].configure(options)


__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "Allocator", "Budget", "CostTable", "LayerOption",
           "Ranks", "bayes_allocate", "cobla_allocate", "cptv_allocate", "energy_allocate", "gavish_donoho_allocate",
           "get_allocator", "greedy_sensitivity_allocate", "pos_cvx_allocate", "pos_greedy_allocate",
           "ratio_allocate", "vbmf_allocate"]
