"""Latency budgets: the compressed model's MEASURED time at most a fraction of the original's.

``compress(..., latency=0.5)`` (CLI ``--latency-budget 0.5``) asks for a model whose forward pass takes at most half
the original's time on one runtime, batch and thread count (``speed_aware={"runtime": ..., "batch": ...,
"threads": ...}``; default eager, batch 1, the current ``torch.get_num_threads()``).

**Cost model** (:func:`latency_model`).  Each target layer is timed alone, dense and factorized at a few sampled
ranks (:func:`rankslim.latency_cache.measure_targets`, cached on disk), and the whole original model once.  The
model's time is taken to be additive::

    T(ranks) = T_rest + sum_i t_i(r_i)        T_rest = T_original - sum_i t_i(dense)

``t_i(r)`` interpolated linearly between the sampled ranks; ``T_rest`` (everything that is not a target: the
layers left dense, activations, norms, the framework's per-call overhead) is what the whole measured model
takes beyond its targets timed alone, and does not change with the ranks.  The assumption is that a layer costs
the same inside the model as alone (same input shape, batch, threads); it fails where the runtime fuses layers
(ONNX Runtime graph optimizations) or where caches behave differently in the whole pass, so the built model is
measured again at the end and both fractions are reported.  If the targets timed alone add up to more than the
whole model, ``T_rest`` is counted as 0 and fractions are of ``sum_i t_i(dense)`` (a note says so).

A higher rank only adds accuracy, so each rank knob ``r`` stands for the rank at or above it with the least
measured time (:func:`rankslim.latency_cache.fastest_at_or_above`: often a sampled multiple of 8) and costs that
rank's time and parameters.  The costs are then non-decreasing in ``r`` (what allocators assume), the ranks the
allocator chooses are snapped to those ranks, and the smallest reachable time is exactly every layer at its
measured-fastest rank (:func:`rankslim.latency_cache.fastest_ranks`) or dense where nothing is faster.

**Allocation** (:func:`allocate_latency`): the configured allocator (default ``cptv``) on that table, whose MAC
slot holds time (the modelled original = :data:`TIME_UNITS`), with ``Budget(params=..., macs=fraction)``: a
``params`` budget holds as usual, in the same allocation.  A ``macs`` budget holds the same way, on
:attr:`LatencyModel.mac_table`, whose params slot carries MACs (allocators budget two quantities by name; ``latency``
+ ``macs`` + ``params`` together is refused): ``compress(macs=0.5, latency=0.5)`` is the least-error model that
keeps half the MACs AND is predicted to take half the time.

**Check** (:func:`record_latency`): the built model and the original are timed once more;
``report.metrics["latency"]`` holds the requested, predicted and measured fractions, and a measured fraction
more than :data:`NOISE_TOLERANCE` above the request is a warning note (timings are noisy: not an error).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .allocate import Allocation, Allocator, Budget, CostTable
from .cost import Cost
from .errors import BudgetError, OptionError

#: the modelled original time in the time table's units (its MAC slot): predicted fractions are exact to 1e-9
TIME_UNITS = 10 ** 9
#: untimed and timed calls of each whole-model measurement (the original for the cost model, then both models
#: for the check): the median of 10 is steady enough for a fraction, and a whole model is timed only 3 times
MODEL_WARMUP = 3
MODEL_REPEATS = 10
#: a measured fraction above ``requested × (1 + NOISE_TOLERANCE)`` is reported as a warning note; below that it
#: is within what two medians of 10 calls on a busy CPU differ by (a guess on the lenient side, not a benchmark)
NOISE_TOLERANCE = 0.05
#: ``speed_aware`` options a latency budget uses (``margin`` / ``max_seconds`` belong to speed-aware MAC budgets)
LATENCY_OPTIONS = ("runtime", "batch", "threads", "samples")


def check_fraction(value: Any, what: str = "latency") -> float:
    """``value`` as a float in (0, 1]; anything else (NaN, bools, strings, <= 0, > 1) raises BudgetError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise BudgetError(f"the {what} budget must be a fraction in (0, 1] of the original model's measured time "
                          f"(0.5: at most half of it), got {value!r}")
    return float(value)


def check_request(latency: Any, speed_aware: Any, request, *, params: float | None = None,
                  macs: float | None = None, ratio: float | None = None, energy: float | None = None,
                  ranks: Any = None, max_drop: Any = None, example_inputs: Any = None) -> dict[str, Any]:
    """Validate a ``compress(latency=...)`` call before any work: the fraction, what it can be combined with and
    the ``speed_aware`` options (``request``: its parsed :class:`~rankslim.speed_mode.SpeedRequest`).

    Returns the measuring options ``{"runtime", "batch", "threads", "samples"}`` (``threads`` defaults to the
    current ``torch.get_num_threads()``).  Bad values raise BudgetError, bad combinations OptionError.
    """
    check_fraction(latency)
    fixed = next((n for n, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None), None)
    if fixed:
        raise OptionError(f"latency is a budget the allocator meets by choosing ranks, but {fixed} fixes every rank: "
                          f"drop one of them")
    if macs is not None and params is not None:
        raise OptionError("latency, macs and params cannot all be combined: the allocators hold at most two budgeted "
                          "quantities; give latency with macs, or latency with params")
    if max_drop is not None:
        raise OptionError("latency is not combined with max_drop (the accuracy search budgets params or macs): run "
                          "the search, then compress at the budget it found with latency=")
    if example_inputs is not None:
        raise OptionError("a latency budget times the model on a random float input of input_shape: models taking "
                          "example_inputs (token ids, tuples, dicts) are not supported yet")
    if request.explicit and request.mode == "off":
        raise OptionError("a latency budget measures the model, which speed_aware=False (--mac-only) turns off: "
                          "drop one of them")
    if isinstance(speed_aware, Mapping) and "max_seconds" in speed_aware:
        raise OptionError("speed_aware max_seconds (--speed-max-seconds) is auto mode's limit on measuring; a latency "
                          "budget always measures: drop it")
    if isinstance(speed_aware, Mapping) and "check" in speed_aware:
        raise OptionError("speed_aware check (--no-speed-check) belongs to speed-aware MAC budgets; a latency budget "
                          "always times the built model: drop it")
    if isinstance(speed_aware, Mapping) and {"time_aware", "error_slack"} & set(speed_aware):
        raise OptionError("speed_aware time_aware / error_slack belong to speed-aware MAC budgets; a latency budget "
                          "allocates on the measured times directly: drop them")
    if "margin" in request.options:
        raise OptionError("speed_aware margin belongs to speed-aware MAC budgets; a latency budget compares measured "
                          "times directly: drop it")
    opts = {k: v for k, v in request.options.items() if k in LATENCY_OPTIONS}
    opts.setdefault("threads", torch.get_num_threads())
    return opts


@dataclass
class LatencyModel:
    """The additive time model of one selection (see the module docstring); times in ms per batch.

    ``table``: the allocators' table, time in its MAC slot (:data:`TIME_UNITS` = the modelled original),
    parameters as counted; ``measured``: ``{layer: {"dense": ms, "ranks": {rank: ms}}}``; ``original_ms``: the
    whole original model measured; ``targets_dense_ms``: the sum of the dense targets timed alone; ``rest_ms``:
    ``max(0, original_ms - targets_dense_ms)``; ``smallest``: the least time fraction the measurements allow.
    """

    table: CostTable
    measured: dict[str, dict[str, Any]]
    #: the same knobs with (MACs, time) in the (params, MAC) slots: the table of ``latency`` + ``macs`` budgets
    mac_table: CostTable | None
    runtime: str
    batch: int
    threads: int
    original_ms: float
    targets_dense_ms: float
    rest_ms: float
    smallest: float = 1.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def model_ms(self) -> float:
        """The modelled original time: ``rest_ms + targets_dense_ms`` (``original_ms`` unless clamped)."""
        return self.rest_ms + self.targets_dense_ms

    def rank_of(self, name: str, r: int | None) -> int | None:
        """The rank a knob ``r`` of layer ``name`` stands for: the fastest measured at or above it."""
        from .latency_cache import fastest_at_or_above
        if r is None:
            return None
        lo = self.table.by_name()[name]
        return fastest_at_or_above(self.measured[name]["ranks"], int(r), lo.max_rank, self.table.round_to)

    def predicted_ms(self, ranks: Mapping[str, int | None]) -> float:
        """Modelled time (ms per batch) of the model with ``ranks`` (missing or ``None``: dense)."""
        from .latency_cache import interpolate
        t = self.rest_ms
        for name, m in self.measured.items():
            r = ranks.get(name)
            t += float(m["dense"]) if r is None else interpolate(m["ranks"], int(r))
        return t

    def fraction(self, ranks: Mapping[str, int | None]) -> float:
        """Predicted time fraction of ``ranks``: ``predicted_ms(ranks) / model_ms``."""
        return self.predicted_ms(ranks) / self.model_ms if self.model_ms > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-rank timings: those are in the latency cache)."""
        return {"original_ms": self.original_ms, "targets_dense_ms": self.targets_dense_ms, "rest_ms": self.rest_ms,
                "smallest": self.smallest, "measure_seconds": round(self.seconds, 3),
                "assumption": "additive: T = T_rest + sum of the target layers timed alone"}


def latency_model(selection, table: CostTable, *, runtime: str = "eager", batch: int = 1, threads: int | None = None,
                  samples: int = 8, cache=None) -> LatencyModel:
    """Time the targets (cached) and the whole original model, and build the time table (module docstring).

    ``selection``: a :class:`~rankslim.pipeline.Selection` whose working copy is still uncompressed; ``table``:
    its :func:`~rankslim.pipeline.cost_table` with the quantities to budget (``("macs",)``, or ``("params",
    "macs")`` to hold a params budget too): parameter costs and spectra are kept, MAC costs become time.
    """
    from .bench import make_example
    from .latency_cache import fastest_at_or_above, interpolate, measure_targets, time_model_ms

    if "macs" not in table.quantities:
        raise BudgetError("a latency table is built from a cost table with 'macs' among its quantities (time takes "
                          "the MAC slot)")
    t0 = time.perf_counter()
    threads = int(threads or torch.get_num_threads())
    measured = measure_targets(selection, table, runtime=runtime, batch=batch, threads=threads, samples=samples,
                               cache=cache)
    # the working copy is the original model until build() swaps layers in
    original_ms = time_model_ms(selection.model, make_example(selection.input_shape, batch), runtime=runtime,
                                threads=threads, warmup=MODEL_WARMUP, repeats=MODEL_REPEATS)
    dense_ms = sum(float(m["dense"]) for m in measured.values())
    rest_ms = max(0.0, original_ms - dense_ms)
    notes = []
    if dense_ms > original_ms:
        notes.append(f"latency budget: the target layers timed alone take {dense_ms:.3g} ms, more than the whole "
                     f"model ({original_ms:.3g} ms): the rest of the model is counted as 0 ms and predicted "
                     "fractions are of the layers' sum")
    scale = TIME_UNITS / (rest_ms + dense_ms) if rest_ms + dense_ms > 0 else 0.0
    options, mac_options = [], []
    for lo in table.layers:
        times = measured[lo.name]["ranks"]
        dense_time = int(round(scale * float(measured[lo.name]["dense"])))

        def cost_fn(r: int, lo=lo, times=times, first: str = "params") -> Cost:
            s = fastest_at_or_above(times, r, lo.max_rank, table.round_to)
            # ceil: the integer table never predicts less time than the float model
            return Cost(lo.cost_fn(s).get(first), int(math.ceil(scale * interpolate(times, s))))
        options.append(dataclasses.replace(lo, cost_fn=cost_fn, faster=None, dense=Cost(lo.dense.params, dense_time)))
        mac_options.append(dataclasses.replace(lo, cost_fn=functools.partial(cost_fn, first="macs"), faster=None,
                                               dense=Cost(lo.dense.macs, dense_time)))
    timed = CostTable(options, Cost(table.original.params, TIME_UNITS), round_to=table.round_to,
                      quantities=table.quantities)
    # MACs ride in the params slot: allocators budget two quantities by name, and a latency + macs budget has no
    # params budget (refused by check_request)
    mac_timed = CostTable(mac_options, Cost(table.original.macs, TIME_UNITS), round_to=table.round_to,
                          quantities=("params", "macs"))
    model = LatencyModel(timed, measured, mac_timed, runtime, int(batch), threads, original_ms, dense_ms, rest_ms,
                         notes=notes)
    # on time alone (a params budget may keep layers dense that would be faster): the integer table's least total
    time_only = dataclasses.replace(timed, quantities=("macs",))
    model.smallest = time_only.total(time_only.cheapest()).macs / TIME_UNITS
    model.seconds = time.perf_counter() - t0
    return model


def _up(x: float, digits: int = 4) -> str:
    """``x`` rounded UP at ``digits`` decimals: a printed smallest fraction the user can ask for as written."""
    return f"{math.ceil(x * 10 ** digits - 1e-9) / 10 ** digits:.{digits}f}"


def allocate_latency(selection, model: LatencyModel, allocator: Allocator, fraction: float, *,
                     params: float | None = None, macs: float | None = None, calibration=None, seed: int = 0,
                     solver: str = "auto", eval_fn=None) -> Allocation:
    """Ranks whose predicted time is at most ``fraction`` of the original's (and parameters at most ``params`` of
    them, or MACs at most ``macs`` of them, when given), chosen by ``allocator`` on ``model.table`` (with ``macs``:
    ``model.mac_table``) and snapped to the fastest measured rank at or above each (:meth:`LatencyModel.rank_of`).

    Raises :class:`BudgetError` naming the smallest time fraction the measurements allow when ``fraction`` is
    below it, and the params / MACs / joint reason when those cannot be met.
    """
    from .pipeline import allocate

    fraction = check_fraction(fraction)
    if allocator.budget != "required":
        raise OptionError(f"the {allocator.name} allocator does not meet a budget; a latency budget needs one that "
                          "does (cptv, pos-greedy, pos-cvx, cobla, bayes, greedy-sensitivity)")
    how = f"{model.runtime}, batch {model.batch}, {model.threads} thread(s)"
    if fraction < model.smallest:
        n_fast = sum(1 for r in model.table.cheapest().values() if r is not None)
        raise BudgetError(
            f"latency budget {fraction:g} cannot be met: the smallest time fraction the measurements allow is "
            f"{_up(model.smallest)} ({n_fast} of {len(model.table.layers)} target layer(s) at their measured-fastest "
            f"rank, the others dense; the rest of the model alone takes {model.rest_ms / model.model_ms:.3g}), timed "
            f"on {how}. Raise the latency budget or target more layers (include/min_params)"
            + (", or time at a larger batch (speed_aware={'batch': 32}, --speed-batch), where factorized layers gain "
               "more" if model.batch < 32 else "") + ".")
    if params is not None and macs is not None:
        raise OptionError("latency, macs and params cannot all be combined: give latency with one of them")
    table = model.table if macs is None else model.mac_table
    budget = Budget(params=params if macs is None else macs, macs=fraction)
    if macs is not None:
        # MAC arithmetic is the plain cost table's; a layer counts here only at ranks faster AND cheaper than dense
        low = table.total(table.cheapest())
        if low.params > budget.limit("params", table.original):
            raise BudgetError(
                f"latency {fraction:g} and macs {macs:g} cannot both be met: the least of both together (every layer at "
                f"its fastest rank that also saves MACs, the others dense) is time {_up(low.macs / TIME_UNITS)}, MACs "
                f"{_up(low.params / max(table.original.params, 1))}. Raise one of them.")
        if low.macs > budget.limit("macs", table.original):
            raise BudgetError(
                f"latency budget {fraction:g} cannot be met with macs: the smallest predicted time of a model whose "
                f"factorized layers also save MACs is {_up(low.macs / TIME_UNITS)}. Raise the latency budget.")
    elif params is not None:
        model.table.require_feasible(Budget(params=params))  # the params reason alone, in params words
        low = model.table.total(model.table.cheapest())
        if not model.table.fits(model.table.cheapest(), budget):
            raise BudgetError(
                f"latency {fraction:g} and params {params:g} cannot both be met: the least of both together (every "
                f"layer at its fastest rank that also saves parameters) is time {_up(low.macs / TIME_UNITS)}, params "
                f"{_up(low.params / max(model.table.original.params, 1))}. Raise one of them.")
    got = allocate(selection, table, allocator, budget, calibration=calibration, seed=seed, solver=solver,
                   eval_fn=eval_fn)
    ranks = {name: model.rank_of(name, r) for name, r in got.items()}
    snapped = sorted(n for n in ranks if ranks[n] != got.get(n))
    # an allocator's singular-value scales (COBLA) were computed for its own rank: a snapped layer is truncated
    scales = {n: s for n, s in got.scales.items() if n not in snapped}
    return Allocation(ranks, scales, {**got.info, **({"snapped_to_faster_rank": len(snapped)} if snapped else {})})


def describe_latency(d: Mapping[str, Any]) -> str:
    """One line from ``report.metrics["latency"]`` of a latency budget: requested, predicted, measured."""
    on = d.get("timed_on", {})
    return (f"latency: measured {d['measured']:.3f} of the original's time (requested <= {d['requested']:g}, "
            f"predicted {d['predicted']:.3f}; {d['original_ms']:.3g} -> {d['compressed_ms']:.3g} ms per batch of "
            f"{on.get('batch')}, {on.get('runtime')}, {on.get('threads')} thread(s))")


def record_latency(report, model: LatencyModel, compressed: nn.Module, ranks: Mapping[str, int | None],
                   fraction: float, *, original: nn.Module | None, input_shape) -> dict[str, Any]:
    """Time ``compressed`` and ``original`` (``None``: reuse the cost model's measurement, e.g. after
    ``inplace=True``) once more and store ``report.metrics["latency"]``: ``requested``, ``predicted`` (by the
    cost model for ``ranks``), ``measured`` (fractions), both times, ``over`` and the cost model.  A measured
    fraction above the request is a note: a warning beyond :data:`NOISE_TOLERANCE`.  Returns the dict."""
    from .bench import make_example
    from .latency_cache import time_model_ms

    x = make_example(input_shape, model.batch)
    kw = dict(runtime=model.runtime, threads=model.threads, warmup=MODEL_WARMUP, repeats=MODEL_REPEATS)
    orig_ms = time_model_ms(original, x, **kw) if original is not None else model.original_ms
    comp_ms = time_model_ms(compressed, x, **kw)
    measured = comp_ms / orig_ms if orig_ms > 0 else float("nan")
    predicted = model.fraction(ranks)
    over = not measured <= fraction * (1 + NOISE_TOLERANCE)
    d = {"requested": fraction, "predicted": predicted, "measured": measured, "original_ms": orig_ms,
         "compressed_ms": comp_ms, "over": over,
         "timed_on": {"runtime": model.runtime, "batch": model.batch, "threads": model.threads,
                      "warmup": MODEL_WARMUP, "repeats": MODEL_REPEATS},
         "cost_model": model.to_dict()}
    report.metrics["latency"] = d
    report.notes.extend(model.notes)
    if over:
        report.notes.append(
            f"warning: the measured time fraction {measured:.3f} is above the latency budget {fraction:g} (beyond "
            f"the {NOISE_TOLERANCE:.0%} noise tolerance; predicted {predicted:.3f} from the layers timed alone): the "
            "layers cost more inside the model than alone, or the machine was busy; re-measure on an idle machine "
            "(rankslim bench) or ask for a smaller fraction")
    elif measured > fraction:
        report.notes.append(f"the measured time fraction {measured:.3f} is slightly above the latency budget "
                            f"{fraction:g}, within the {NOISE_TOLERANCE:.0%} noise tolerance of timings")
    return d


__all__ = ["LATENCY_OPTIONS", "LatencyModel", "MODEL_REPEATS", "MODEL_WARMUP", "NOISE_TOLERANCE", "TIME_UNITS",
           "allocate_latency", "check_fraction", "check_request", "describe_latency", "latency_model",
           "record_latency"]
