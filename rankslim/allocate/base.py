"""The one interface every rank allocator works on: a cost table and a budget.

Allocators are functions ``allocate(table, budget, **options) -> dict[name, rank | None]`` where
``None`` keeps a layer dense.  They never touch modules: everything they may need (costs as a
function of the rank knob, singular-value spectra, the untouched rest of the model) is in the
:class:`CostTable`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..cost import Cost
from ..errors import BudgetError

Ranks = dict[str, "int | None"]


@dataclass(frozen=True)
class Budget:
    """Fractions of the *whole original model*: ``params`` (stored numbers) and/or ``macs`` (per sample)."""

    params: float | None = None
    macs: float | None = None

    def __post_init__(self) -> None:
        for q in ("params", "macs"):
            v = getattr(self, q)
            if v is not None and not (0.0 < v <= 1.0):  # also refuses NaN
                raise BudgetError(f"the {q} budget must be a fraction in (0, 1] of the original model, got {v}")

    @property
    def quantities(self) -> list[str]:
        """The budgeted quantities, e.g. ``["params", "macs"]``; empty when no budget is set."""
        return [q for q in ("params", "macs") if getattr(self, q) is not None]

    def is_set(self) -> bool:
        return bool(self.quantities)

    def limit(self, quantity: str, original: Cost) -> float:
        """The absolute limit on ``quantity`` for a model whose original cost is ``original``."""
        return float(getattr(self, quantity)) * original.get(quantity)


@dataclass
class LayerOption:
    """What an allocator knows about one target layer.

    ``cost_fn(r)`` is the factorized cost at knob ``r`` in ``[1, max_rank]``; ``dense`` the cost of
    leaving the layer alone; ``sigma`` the descending spectrum (length ``max_rank``) — for data-aware
    methods the spectrum of the problem they solve (see :meth:`rankslim.methods.Method.data_spectrum`);
    ``min_rank``: no allocation goes below it (an output head keeps at least as many ranks as classes).
    """

    name: str
    max_rank: int
    dense: Cost
    cost_fn: Callable[[int], Cost]
    sigma: torch.Tensor
    method: str = "svd"
    min_rank: int = 1
    #: speed-aware mode: ``faster(r)`` is True when the factorized layer at knob ``r`` is measurably faster
    faster: Callable[[int], bool] | None = None


@dataclass
class CostTable:
    """All targets, plus the cost of everything that is not a target.

    ``original`` is the whole model's cost (its MACs as ``FlopCounterMode`` counts them);
    ``fixed = original - sum(dense target costs)`` stays whatever the allocator decides.
    ``quantities`` are the quantities in which a factorized layer must be cheaper than the dense
    one to be used (a layer whose factorized form is not cheaper is kept dense).
    """

    layers: list[LayerOption]
    original: Cost
    round_to: int = 1
    quantities: tuple[str, ...] = ("params",)
    fixed: Cost = field(init=False)

    def __post_init__(self) -> None:
        dense = Cost()
        for lo in self.layers:
            dense = dense + lo.dense
        self.fixed = self.original - dense

    def by_name(self) -> dict[str, LayerOption]:
        return {lo.name: lo for lo in self.layers}

    def rounded(self, lo: LayerOption, r: int) -> int:
        """``r`` rounded up to a multiple of ``round_to`` and clipped to ``[min_rank, max_rank]``."""
        k = self.round_to
        r = int(math.ceil(max(r, lo.min_rank, 1) / k) * k)
        return max(1, min(r, lo.max_rank))

    def worth_it(self, lo: LayerOption, r: int) -> bool:
        """True when the factorized layer at knob ``r`` is cheaper than dense in every budgeted quantity
        (and, in speed-aware mode, measurably faster)."""
        c = lo.cost_fn(r)
        if lo.faster is not None and not lo.faster(r):
            return False
        return all(c.get(q) < lo.dense.get(q) for q in self.quantities)

    def decide(self, lo: LayerOption, r: int | None) -> int | None:
        """Round ``r`` and return it, or ``None`` (keep dense) when factorizing would not save."""
        if r is None:
            return None
        r = self.rounded(lo, r)
        return r if self.worth_it(lo, r) else None

    def layer_cost(self, lo: LayerOption, r: int | None) -> Cost:
        return lo.dense if r is None else lo.cost_fn(r)

    def total(self, ranks: Mapping[str, int | None]) -> Cost:
        """Whole-model cost when each target gets ``ranks[name]`` (missing or ``None``: dense)."""
        t = self.fixed
        for lo in self.layers:
            t = t + self.layer_cost(lo, ranks.get(lo.name))
        return t

    def fits(self, ranks: Mapping[str, int | None], budget: Budget) -> bool:
        """True when ``ranks`` meets every budgeted quantity."""
        t = self.total(ranks)
        return all(t.get(q) <= budget.limit(q, self.original) for q in budget.quantities)

    def cheapest(self) -> Ranks:
        """Every layer at its smallest useful rank: the least a budget can ask for."""
        return {lo.name: self.decide(lo, 1) for lo in self.layers}

    def require_feasible(self, budget: Budget) -> None:
        """Raise :class:`BudgetError` with the reason when no allocation can meet ``budget``."""
        low = self.total(self.cheapest())
        bad = [q for q in budget.quantities if low.get(q) > budget.limit(q, self.original)]
        if bad:
            parts = []
            for q in bad:
                parts.append(
                    f"{q}: asked for {getattr(budget, q):.3g} of {self.original.get(q):,} but the smallest reachable "
                    f"is {low.get(q) / self.original.get(q):.3g} (layers left untouched alone cost "
                    f"{self.fixed.get(q) / self.original.get(q):.3g})"
                )
            raise BudgetError("budget cannot be met — " + "; ".join(parts)
                              + ". Raise the budget or target more layers (include/min_params).")


def energy_ranks(table: CostTable, beta: float) -> Ranks:
    """Each layer's smallest rank keeping a fraction ``beta`` of its squared-spectrum energy."""
    from ..decompose.svd import energy_rank
    return {lo.name: table.decide(lo, energy_rank(lo.sigma, beta)) for lo in table.layers}


@dataclass
class AllocationContext:
    """What model-aware allocators (COBLA, Bayesian or sensitivity search) may use besides the table.

    ``model``: the uncompressed working copy (do not modify it); ``targets``: the target layers in
    forward order; ``methods``: target name -> configured :class:`~rankslim.methods.Method` (allocators
    use its capabilities: ``maskable``/``matricize``, ``spectrum_shape``, ``evbmf_knob``); ``batches``: calibration inputs (may
    be empty); ``eval_fn``: optional user callback ``eval_fn(model) -> float`` (higher is better);
    ``build``: ``build(ranks) -> nn.Module`` returns a compressed copy for candidate ranks.
    """

    model: "torch.nn.Module"
    targets: list
    methods: dict[str, Any]
    batches: list[torch.Tensor]
    input_shape: tuple[int, ...]
    seed: int = 0
    eval_fn: Callable | None = None
    build: Callable | None = None


class Allocation(dict):
    """What an allocator may return instead of a plain ``{name: rank | None}`` dict.

    It *is* that dict (so every caller that only wants ranks keeps working) and carries two
    optional extras:

    * ``scales``: ``{name: (max_rank,) float64 tensor}`` — per-singular-value factors of a layer's
      spectrum (COBLA's ``P_j <- m_hat_j P_j``; zero outside the kept set ``S_sigma``).  A layer with
      scales must be decomposed from ``unmatricize(U diag(scales * sigma) V^T)`` instead of its own
      weight; the build stage passes :func:`rankslim.allocate.masked.scaled_weight` to the method
      (rank exactly ``ranks[name]``, so the method's truncated SVD at that rank reproduces it exactly).
    * ``info``: JSON-able diagnostics (solver time, iterations, objective values, what a
      budget-free rule yields, ...).
    """

    def __init__(self, ranks: Mapping[str, "int | None"] | None = None,
                 scales: Mapping[str, torch.Tensor] | None = None, info: dict | None = None) -> None:
        super().__init__(ranks or {})
        self.scales: dict[str, torch.Tensor] = dict(scales or {})
        self.info: dict = dict(info or {})


def budget_fractions(table: CostTable, ranks: Mapping[str, "int | None"]) -> dict[str, float]:
    """Whole-model ``{"params": f, "macs": f}`` kept by ``ranks`` (fractions of ``table.original``)."""
    t = table.total(ranks)
    return {q: t.get(q) / max(table.original.get(q), 1) for q in ("params", "macs")}


def scaled_ranks(table: CostTable, base: Mapping[str, "int | None"], t: float) -> Ranks:
    """``base`` ranks multiplied by ``t`` in (0, 1] (dense layers count as ``max_rank``), decided per layer."""
    out: Ranks = {}
    for lo in table.layers:
        b = base.get(lo.name)
        b = lo.max_rank if b is None else int(b)
        out[lo.name] = table.decide(lo, max(1, int(math.floor(t * b))))
    return out


def project_to_budget(table: CostTable, ranks: Mapping[str, "int | None"], budget: Budget,
                      iters: int = 40) -> Ranks:
    """``ranks`` if they fit ``budget``; else every rank scaled by the largest common factor ``t``
    (bisection) that fits — the projection along the ray towards rank 1 used by the search allocators.

    Call :meth:`CostTable.require_feasible` first: at ``t -> 0`` every layer is at rank 1, the
    cheapest allocation, so the result always fits when the budget is feasible at all.
    """
    ranks = {lo.name: ranks.get(lo.name) for lo in table.layers}
    if not budget.is_set() or table.fits(ranks, budget):
        return ranks
    lo_t, hi_t = 0.0, 1.0
    best = scaled_ranks(table, ranks, 0.0)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        cand = scaled_ranks(table, ranks, mid)
        if table.fits(cand, budget):
            lo_t, best = mid, cand
        else:
            hi_t = mid
    return best
