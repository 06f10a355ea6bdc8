"""The stages of compression, each a function with typed input and output.

    select(model, ...)                       -> Selection    targets, their configured methods, skipped layers
    calibrate(selection, data, ...)          -> Calibration  batches, streaming statistics (only if needed)
    cost_table(selection, calibration, ...)  -> CostTable    costs and the spectrum of each method's problem
    allocate(selection, table, ...)          -> Allocation   ranks (+ singular-value scales, info)
    build(selection, allocation, ...)        -> Built        the only stage that swaps modules (via surgery)
    finalize(selection, built, ...)          -> CompressionResult   BN re-estimation, plan, report

:func:`rankslim.compress` is the one-call path through them; benchmarks and training reuse the stages.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .allocate import Allocation, Allocator, Budget, CostTable, LayerOption, get_allocator
from .allocate.base import AllocationContext, Ranks
from .allocate.masked import scaled_weight
from .cost import Cost, LayerShapes, flop_counter_macs, model_cost, trace_shapes
from .errors import BudgetError, OptionError, RankError, RankslimError
from .methods import METHODS, DecomposeContext, Method, get_method
from .plan import LayerPlan, Plan, attach_plan
from .report import LayerRow, Report
from .surgery import Skipped, Target, replace_modules, select_targets, working_copy

#: accuracy drop (fraction) above which a run warns (CLI) — see README "main job"
WARN_DROP = 0.03
#: samples per calibration forward pass (``compress(calib_batch_size=)``, ``--calib-batch``)
CALIB_BATCH = 64


# ------------------------------------------------------------------------------------------- select


@dataclass
class Selection:
    """What :func:`select` decided.

    ``model``: the working copy (the user's model itself only when ``inplace``); ``original``: the
    user's model; ``targets`` in forward order with ``methods[name]`` their configured method;
    ``skipped`` with reasons; ``heads``: targets whose output is the model's output;
    ``original_cost``: params and MACs per sample (MACs by ``FlopCounterMode``); ``shapes``: traced shapes;
    ``n_classes``: the last dimension of a 2-D model output (classes), else ``None``.
    """

    model: nn.Module
    original: nn.Module
    input_shape: tuple[int, ...]
    targets: list[Target]
    methods: dict[str, Method]
    skipped: list[Skipped]
    heads: list[str]
    original_cost: Cost
    counted_macs: int
    shapes: LayerShapes
    spec: str | None = None
    dataset: str | None = None
    n_classes: int | None = None
    #: the one-sample inputs costs were counted on (``None``: a zero float input of ``input_shape``)
    example: Any = None

    @property
    def needs_data(self) -> bool:
        """True when some target's method is data-aware."""
        return any(m.needs_data for m in self.methods.values())


def method_for(name: str, default: str, per_layer: Mapping[str, str] | None) -> str:
    """Method of layer ``name``: the first matching glob in ``per_layer``, else ``default``."""
    for pattern, m in (per_layer or {}).items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return m
    return default


def split_method_options(default: str, options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` from either form users pass.

    Flat ``{"damping": 1e-3}`` belongs to the default method; ``{"grebdec": {"t": -1}}`` or dotted
    ``{"grebdec.t": -1}`` (the CLI's ``-M grebdec.t=-1``) name the method.  Unknown method names are refused.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        if key in METHODS and isinstance(value, Mapping):
            out.setdefault(key, {}).update(value)
            continue
        meth, dot, opt = str(key).partition(".")
        if dot and meth in METHODS:
            out.setdefault(meth, {})[opt] = value
        elif dot:
            raise OptionError(f"method option {key!r} names no method (methods: {', '.join(sorted(METHODS))})")
        else:
            out.setdefault(default, {})[key] = value
    return out


def find_heads(model: nn.Module, example: Any, output_shapes: list | None = None) -> list[str]:
    """Names of the Linear/Conv layers whose output is (a tensor of) the model's output: the classifier / LM head.

    Found by object identity of the tensors in one eval forward pass on ``example``; when the output is
    computed after the last layer (a softmax, a reshape), the last such layer called is the head if its
    output has as many elements as the model's first output.  ``output_shapes``, when given, receives
    the shapes of the model's output tensors.
    """
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []
    order: list[tuple[str, int, bool]] = []  # every module with parameters of its own, in call order
    handles = []
    for name, mod in model.named_modules():
        is_layer = isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
        if not is_layer and not any(True for _ in mod.parameters(recurse=False)):
            continue

        def hook(_m, _a, out, name=name, is_layer=is_layer):
            if isinstance(out, torch.Tensor):
                if is_layer:
                    alive.append(out)  # held so that no later tensor can reuse its id or storage
                    produced[id(out)] = name
                    if out.numel():
                        produced.setdefault(out.data_ptr(), name)
                order.append((name, out.numel(), is_layer))
        handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    from .cost import no_fused_attention
    from .inputs import call_model
    try:
        with torch.no_grad(), no_fused_attention():
            out = call_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    leaves: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            leaves.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(out)
    if output_shapes is not None:
        output_shapes.extend(tuple(x.shape) for x in leaves)
    heads = [produced[id(x)] for x in leaves if id(x) in produced]
    # a view of the head's output (flatten, squeeze) shares its storage
    heads += [produced[x.data_ptr()] for x in leaves if x.numel() and x.data_ptr() in produced]
    # an activation after the head (log_softmax): the last module with parameters is that layer and the
    # output has its size; a LayerNorm or other parametrised module after it means it is no head
    if not heads and order and leaves and order[-1][2] and order[-1][1] == leaves[0].numel():
        heads = [order[-1][0]]
    return list(dict.fromkeys(heads))


def select(
    model: nn.Module,
    input_shape: Iterable[int] | None,
    method: str = "svd",
    *,
    methods: Mapping[str, str] | None = None,
    method_options: Mapping[str, Any] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_params: int = 0,
    keep_stem: bool = False,
    keep_head: bool = True,
    inplace: bool = False,
    spec: str | None = None,
    dataset: str | None = None,
    example_inputs: Any = None,
) -> Selection:
    """Choose the layers to compress and configure each one's method (options validated here).

    Costs are counted on ``example_inputs`` (a tensor of any dtype, tuple or dict of tensors; the first
    sample is used) when given, else on a zero float input of the per-sample ``input_shape``.

    ``keep_head`` leaves the output head dense (see :func:`find_heads`); with ``keep_head=False`` the
    head is a target but never gets fewer ranks than its outputs (classes) unless ranks are explicit.
    """
    from .surgery import check_finite
    from .inputs import example_from, sample_shape
    per_method = split_method_options(method, method_options)
    for name in [method, *(methods or {}).values()]:
        get_method(name)  # unknown names fail before any work
    configured = {name: get_method(name, per_method.get(name, {})) for name in {method, *(methods or {}).values()}}
    stray = sorted(set(per_method) - set(configured))
    if stray:
        raise OptionError(f"options were given for method(s) {stray} that no layer uses (methods in use: "
                          f"{', '.join(sorted(configured))})")
    check_finite(model)
    work = working_copy(model, inplace)
    example = example_from(example_inputs, input_shape, work) if example_inputs is not None else None
    input_shape = sample_shape(example) if example is not None else tuple(int(s) for s in input_shape)
    counted_on = example if example is not None else input_shape
    shapes = trace_shapes(work, counted_on)
    targets, skipped = select_targets(work, shapes, include, exclude, min_params, keep_stem)
    out_shapes: list = []
    heads = find_heads(work, example_from(example, input_shape, work), out_shapes) if targets else []
    n_classes = int(out_shapes[0][-1]) if out_shapes and len(out_shapes[0]) == 2 else None
    chosen: dict[str, Method] = {}
    kept: list[Target] = []
    for t in targets:
        if keep_head and t.name in heads:
            skipped.append(Skipped(t.name, type(t.module).__name__,
                                   "output head kept dense (keep_head=True; pass keep_head=False to compress it)"))
            continue
        m = configured[method_for(t.name, method, methods)]
        why = m.supports(t)
        if why:
            skipped.append(Skipped(t.name, type(t.module).__name__, f"{m.name}: {why}"))
            continue
        chosen[t.name] = m
        kept.append(t)
    if not kept:
        raise RankslimError("no layer can be compressed: " + (
            "; ".join(f"{s.name}: {s.reason}" for s in skipped[:10]) or "the model has no Conv2d/Linear layer"))
    base = model_cost(work, counted_on, shapes)
    original = Cost(base.total.params, flop_counter_macs(work, counted_on))
    return Selection(work, model, input_shape, kept, chosen, skipped, heads, original, base.total.macs, shapes,
                     spec, dataset, n_classes, example)


# ---------------------------------------------------------------------------------------- calibrate


@dataclass
class Calibration:
    """Calibration inputs and statistics.

    ``batches``: model inputs; ``calibrator``: streams per-layer statistics for data-aware methods
    (``None`` when no method needs data); ``original_stats``: statistics of each data-aware target on
    the ORIGINAL model's inputs, computed once for allocation and reused when building in independent mode.
    """

    batches: list[torch.Tensor] = field(default_factory=list)
    calibrator: Any = None
    original_stats: dict[str, Any] = field(default_factory=dict)
    sequential: bool = True

    def stats(self, target: Target, work: nn.Module, raw: bool) -> Any:
        """Statistics to decompose ``target`` with: sequential ones from ``work``, else the cached original ones."""
        if self.calibrator is None:
            return None
        cached = self.original_stats.get(target.name)
        if not self.sequential and cached is not None and (not raw or cached.X is not None):
            return cached
        return self.calibrator.stats_for(target, work, raw=raw)


def calibrate(selection: Selection, data: Any, *, calib_samples: int = 256, sequential: bool = True, seed: int = 0,
              want_batches: bool = False, data_spectra: bool = True,
              transform: Callable[[Any], Any] | None = None, batch_size: int = CALIB_BATCH,
              cache_limit_bytes: int | None = None) -> Calibration:
    """Draw calibration inputs when a method needs data or ``want_batches``; check them against the model.

    ``transform`` maps each data item (or DataLoader batch) to model inputs (see
    :func:`~rankslim.data.calibration_batches`).  ``batch_size``: samples per calibration forward pass; the
    activations of one batch in flight are the part of calibration memory that grows with it (statistics are
    accumulated per batch, so the result does not depend on it beyond float64 rounding).  ``cache_limit_bytes``
    bounds the activations the calibrator keeps between targets (default
    :data:`~rankslim.calibrate.DEFAULT_CACHE_LIMIT`, 1 GiB); past it batches are recomputed, so calibration memory
    stops growing with the number of samples (at a cost in time).

    With data-aware methods, builds a :class:`~rankslim.calibrate.Calibrator` and (``data_spectra``)
    the original-input statistics each data-aware target's allocation spectrum needs.
    """
    if data is None and selection.dataset is not None and (selection.needs_data or want_batches):
        data = selection.dataset
    if data is None:
        if selection.needs_data:
            names = sorted({m.name for m in selection.methods.values() if m.needs_data})
            raise RankslimError(f"method(s) {', '.join(names)} need calibration data: pass data=... "
                                "(a dataset name, Dataset or DataLoader)")
        return Calibration(sequential=sequential)
    from .data import calibration_batches
    batches = calibration_batches(data, calib_samples, batch_size=batch_size, seed=seed, transform=transform)
    from .data import check_batches
    # token batches may be longer or shorter than the example: only image-like inputs must match its shape
    from .inputs import tokens_per_sample
    fixed = selection.example is None or tokens_per_sample(selection.example) is None
    check_batches(selection.model, batches, selection.input_shape if fixed else None)
    cal = Calibration(batches=batches, sequential=sequential)
    if selection.needs_data:
        from .calibrate import Calibrator
        aware = [t for t in selection.targets if selection.methods[t.name].needs_data]
        cal.calibrator = Calibrator(selection.model, batches, sequential=sequential, seed=seed,
                                    names=[t.name for t in aware], cache_limit_bytes=cache_limit_bytes)
        if data_spectra:
            for t in aware:
                raw = selection.methods[t.name].needs_raw and not sequential
                cal.original_stats[t.name] = cal.calibrator.stats_for(t, None, raw=raw, sequential=False)
    return cal


# ---------------------------------------------------------------------------------------- cost table


def cost_table(selection: Selection, calibration: Calibration | None = None, *, quantities: Iterable[str] = ("params",),
               round_to: int = 1, keep_head: bool = True) -> CostTable:
    """The allocators' view: each target's cost as a function of its knob and the spectrum of its problem.

    Data-aware methods get :meth:`~rankslim.methods.Method.data_spectrum` on the original-input
    statistics (whitened singular values, or data-weighted importance for pruning); data-free ones
    their own :meth:`~rankslim.methods.Method.spectrum`.
    """
    if round_to < 1:
        raise RankError(f"round_to must be >= 1, got {round_to}")
    stats = calibration.original_stats if calibration is not None else {}
    options = []
    for t in selection.targets:
        m = selection.methods[t.name]
        sigma = m.data_spectrum(t, stats[t.name]) if t.name in stats else m.spectrum(t)
        floor = 1
        if keep_head and selection.n_classes and t.kind == "linear" and t.out_shape[-1] == selection.n_classes:
            # a classifier that head detection did not single out (auxiliary heads): never below its classes
            floor = min(m.max_rank(t), selection.n_classes)
        options.append(LayerOption(t.name, m.max_rank(t), t.per_sample(t.dense_cost),
                                   (lambda r, t=t, m=m: t.per_sample(m.cost(t, r))),
                                   sigma, m.name, min_rank=floor))
    return CostTable(options, selection.original_cost, round_to=round_to, quantities=tuple(quantities) or ("params",))


@dataclass
class SpeedCheck:
    """How speed-aware mode timed the layers: runtime, batch, threads, margin, and per layer the dense and
    sampled factorized medians (ms) from :func:`rankslim.latency_cache.measure_layer` (cached on disk)."""

    runtime: str = "eager"
    batch: int = 1
    threads: int = 1
    margin: float = 0.05
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)


def speed_aware(selection: Selection, table: CostTable, *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                margin: float = 0.05, samples: int = 8) -> tuple[CostTable, SpeedCheck]:
    """``table`` where a layer may be factorized only at ranks where it is measurably faster than dense.

    Each target's dense layer and its factorized layer at ~``samples`` ranks are timed alone on the target
    runtime (cached per machine, runtime, dtype, batch, threads, geometry: :mod:`rankslim.latency_cache`); a rank
    counts as faster when its interpolated time is below ``(1 - margin)`` of dense.  Budgets are unchanged:
    params and MACs are still met exactly; layers that would only be slower stay dense.
    """
    from .latency_cache import interpolate, measure_layer, rank_grid
    check = SpeedCheck(runtime, int(batch), int(threads), float(margin))
    targets = {t.name: t for t in selection.targets}
    layers = []
    for lo in table.layers:
        got = measure_layer(selection.methods[lo.name], targets[lo.name], rank_grid(lo.max_rank, samples),
                            runtime=runtime, batch=batch, threads=threads)
        check.measured[lo.name] = got
        dense_ms, times = float(got["dense"]), {int(k): float(v) for k, v in got["ranks"].items()}

        def faster(r: int, times=times, dense_ms=dense_ms) -> bool:
            return interpolate(times, r) < (1.0 - margin) * dense_ms
        layers.append(dataclasses.replace(lo, faster=faster))
    return CostTable(layers, table.original, round_to=table.round_to, quantities=table.quantities), check


def time_aware(table: CostTable, allocation: Mapping[str, int | None], check: SpeedCheck, budget: Budget, *,
               slack: float = 0.0) -> Allocation:
    """Speed-aware mode's second step: the allocator's ``allocation`` replaced by the fastest allocation (by
    ``check``'s measured layer times) that meets ``budget`` with an error proxy at most ``1 + slack`` times its
    own (:func:`rankslim.allocate.timed.fastest_within_error`), when predicted at least ``check.margin`` faster
    (the threshold a layer passes too).  Singular-value scales (COBLA) are kept only for
    layers whose rank did not change; ``info["time_aware"]`` records both predicted times and errors."""
    from .allocate.timed import fastest_within_error
    got = fastest_within_error(table, allocation, check.measured, budget, slack=slack, min_gain=check.margin)
    changed = sorted(n for n in got if got[n] != allocation.get(n))
    scales = {n: v for n, v in getattr(allocation, "scales", {}).items() if n not in changed}
    info = {**getattr(allocation, "info", {}), "time_aware": {**got.info, "changed_layers": len(changed)}}
    return Allocation(dict(got), scales, info)


# ------------------------------------------------------------------------------------------ allocate


def choose_allocator(budget: Budget, ratio: float | None, energy: float | None, ranks: Any,
                     allocator: str | None, allocator_options: Mapping[str, Any] | None) -> Allocator | None:
    """The configured allocator a call asks for (``None`` for explicit ``ranks``); conflicts are refused."""
    modes = [n for n, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None]
    if len(modes) > 1:
        raise BudgetError(f"choose one of ratio / energy / ranks, not {' and '.join(modes)}")
    if modes:
        if budget.is_set():
            raise BudgetError(f"{modes[0]} fixes every rank; it cannot be combined with a params/macs budget")
        if allocator is not None:
            raise BudgetError(f"{modes[0]} fixes every rank; it cannot be combined with allocator={allocator!r}")
        if allocator_options:
            raise OptionError(f"allocator options {sorted(allocator_options)} have no allocator to go to: "
                              f"{modes[0]} fixes every rank")
        if modes[0] == "ranks":
            return None
        return get_allocator(modes[0], {modes[0]: ratio if modes[0] == "ratio" else energy})
    if not budget.is_set() and allocator is None:
        raise BudgetError("say how much to compress: a budget (params=F and/or macs=F), ratio=F, energy=F, ranks={...} "
                          "or a budget-free allocator (allocator='vbmf' or 'gavish-donoho')")
    alloc = get_allocator(allocator or "cptv", allocator_options)
    if alloc.budget == "own":
        raise BudgetError(f"use {alloc.name}=F instead of allocator={alloc.name!r}")
    if alloc.budget == "required" and not budget.is_set():
        raise BudgetError(f"the {alloc.name} allocator needs a params and/or macs budget")
    return alloc


def explicit_ranks(table: CostTable, ranks: int | Mapping[str, int]) -> Ranks:
    """``{layer: rank}`` from one int for every layer or ``{glob: rank}``; impossible ranks are refused."""
    def as_rank(v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise RankError(f"rank for {where} must be a whole number, got {v!r}")
        return int(v)
    names = table.by_name()
    if isinstance(ranks, Mapping):
        unknown = [k for k in ranks if not any(fnmatch.fnmatchcase(n, k) for n in names)]
        if unknown:
            raise RankError(f"no target layer matches {unknown}; targets are: {', '.join(names)}")
    elif not isinstance(ranks, int) or isinstance(ranks, bool):
        raise RankError(f"ranks must be an int or a {{glob: int}} mapping, got {ranks!r}")
    out: Ranks = {}
    for lo in table.layers:
        r = ranks if isinstance(ranks, int) else next(
            (v for k, v in ranks.items() if fnmatch.fnmatchcase(lo.name, k)), None)
        if r is None:
            out[lo.name] = None
            continue
        r = as_rank(r, repr(lo.name))
        if not 1 <= r <= lo.max_rank:
            raise RankError(f"rank {r} is impossible for layer {lo.name!r}: it must lie in [1, {lo.max_rank}] "
                            f"(min(m, k) of its {lo.method} factorization)")
        out[lo.name] = r
    return out


def allocate(selection: Selection, table: CostTable, allocator: Allocator | None, budget: Budget, *,
             ranks: Any = None, calibration: Calibration | None = None, seed: int = 0, solver: str = "auto",
             eval_fn: Callable[[nn.Module], float] | None = None) -> Allocation:
    """Run the allocator (or take explicit ``ranks``) and return an :class:`Allocation` (ranks, scales, info)."""
    if allocator is None:
        return Allocation(explicit_ranks(table, ranks), info={"allocator": "ranks"})
    context = None
    if allocator.needs_context:
        cal = calibration or Calibration()
        context = AllocationContext(
            selection.model, selection.targets, dict(selection.methods), cal.batches, selection.input_shape, seed,
            eval_fn, build=lambda rk: build(selection, Allocation(rk), cal, seed=seed, solver=solver,
                                            inplace=False).model)
    got = allocator(table, budget, context)
    alloc = got if isinstance(got, Allocation) else Allocation(got)
    alloc.info = {"allocator": allocator.name, **alloc.info}
    return alloc


# --------------------------------------------------------------------------------------------- build


@dataclass
class Built:
    """The compressed model (plan not yet attached), one plan entry and one report row per target."""

    model: nn.Module
    layer_plans: list[LayerPlan]
    rows: list[LayerRow]
    notes: list[str] = field(default_factory=list)


def build(selection: Selection, allocation: Mapping[str, int | None], calibration: Calibration | None = None, *,
          seed: int = 0, solver: str = "auto", progress: bool = False, inplace: bool = True) -> Built:
    """Decompose every target that has a rank and swap it in (forward order, so a sequential calibrator
    sees the earlier layers already compressed).  ``inplace=False`` builds on a fresh copy of the work model.

    Singular-value scales in ``allocation.scales`` (COBLA) reach the method as ``DecomposeContext.weight``.
    """
    work = selection.model
    targets = selection.targets
    if not inplace:
        work = working_copy(work)
        targets = [dataclasses.replace(t, module=work.get_submodule(t.name)) for t in targets]
    scales = getattr(allocation, "scales", None) or {}
    gen = torch.Generator().manual_seed(seed)
    built = Built(work, [], [])
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("decomposing", total=len(targets))
    rescaled = 0
    try:
        for t in targets:
            m = selection.methods[t.name]
            r = allocation.get(t.name)
            dense = t.per_sample(t.dense_cost)
            if r is None:
                built.rows.append(LayerRow(t.name, t.type_name, t.describe_shape(), "dense", "full",
                                           dense.params, dense.params, dense.macs, dense.macs))
            else:
                t0 = time.perf_counter()
                stats = (calibration.stats(t, work, raw=m.needs_raw)
                         if (calibration is not None and m.needs_data) else None)
                weight = None
                if t.name in scales:
                    if not m.maskable:
                        raise BudgetError(f"layer {t.name!r}: singular-value scales need a spectrum-masking method "
                                          f"(svd, spatial), got {m.name!r}")
                    weight = scaled_weight(t.module.weight, scales[t.name], m)
                    rescaled += 1
                ctx = DecomposeContext(generator=gen, solver=solver, stats=stats, options=dict(m.config), weight=weight)
                layer, info = m.decompose(t, r, ctx)
                # measured on the built layer: a method may build below the planned rank (elbow rules)
                c = t.per_sample(model_cost(layer, t.in_shape).total)
                # a layer seen through a view (Conv1d, GPT-2 Conv1D, subclasses) gets its wrapper
                replace_modules(work, {t.name: t.wrap(layer)})
                rank_str = str(info.get("ranks", info.get("rank", r)))
                built.rows.append(LayerRow(t.name, t.type_name, t.describe_shape(), m.name, rank_str,
                                           dense.params, c.params, dense.macs, c.macs, info,
                                           time.perf_counter() - t0))
                built.layer_plans.append(LayerPlan(t.name, m.name, info, t.type_name))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    if rescaled:
        built.notes.append(f"singular values of {rescaled} layer(s) rescaled by the allocator's masks")
    return built


# ------------------------------------------------------------------------------------------ finalize


@dataclass
class CompressionResult:
    """What :func:`rankslim.compress` returns: the compressed ``model`` (plan attached), its ``plan``,
    ``report`` and the ``allocation`` that chose its ranks (ranks, singular-value scales, allocator info)."""

    model: nn.Module
    plan: Plan
    report: Report
    allocation: Allocation | None = None


def finalize(selection: Selection, built: Built, allocation: Allocation, calibration: Calibration | None, *,
             budget: Budget, method: str, budget_request: Mapping[str, Any], bn_recalibrate: bool = False,
             timings: Mapping[str, float] | None = None, was_training: bool = False) -> CompressionResult:
    """BatchNorm re-estimation (optional), plan, report, and the budget check on the built model."""
    notes = list(built.notes)
    work = built.model
    timings = dict(timings or {})
    if bn_recalibrate:
        if calibration is None or not calibration.batches:
            raise RankslimError("bn_recalibrate needs calibration inputs: pass data=... (dataset name, Dataset or DataLoader)")
        from .bn import recalibrate_bn
        t0 = time.perf_counter()
        n_bn = recalibrate_bn(work, calibration.batches)
        timings["bn_recalibrate"] = time.perf_counter() - t0
        notes.append(f"BatchNorm statistics of {n_bn} layers re-estimated on "
                     f"{sum(len(b) for b in calibration.batches)} calibration inputs")
    work.train(was_training)
    plan = Plan(built.layer_plans, model_spec=selection.spec, input_shape=list(selection.input_shape))
    attach_plan(work, plan)
    counted_on = selection.example if selection.example is not None else selection.input_shape
    after = model_cost(work, counted_on)
    compressed = Cost(after.total.params, after.total.macs + (selection.original_cost.macs - selection.counted_macs))
    notes += input_notes(selection, built)
    sparse_note = next((r.info["sparse_note"] for r in built.rows if r.info.get("sparse_note")), None)
    if sparse_note:
        notes.append(str(sparse_note))
    from .decompose.svd import LARGE_MIN_ENTRIES
    solvers = sorted({str(r.info.get("solver")) for r in built.rows if r.info.get("solver")})
    if solvers:
        notes.append(f"SVD solver(s) used: {', '.join(solvers)} (matrices with at least {LARGE_MIN_ENTRIES:,} entries "
                     "use the randomized range finder for ranks under 10% of the smaller side, else the Gram "
                     "eigendecomposition; smaller ones an exact SVD)")
    if calibration is not None and calibration.original_stats:
        notes.append(f"allocation saw the data-aware spectrum of {len(calibration.original_stats)} layer(s) "
                     "(whitened singular values / data-weighted importance on the original model's inputs)")
    heads = [h for h in selection.heads if h not in selection.methods]
    if heads:
        notes.append(f"output head {', '.join(heads)} kept dense (keep_head)")
    report = Report(rows=built.rows, skipped=[s.__dict__ for s in selection.skipped], original=selection.original_cost,
                    compressed=compressed, budget=dict(budget_request), allocator=str(allocation.info.get("allocator")),
                    method=method, input_shape=list(selection.input_shape), seconds=timings, notes=notes)
    info = {k: v for k, v in allocation.info.items() if k != "allocator"}
    if info:
        report.metrics["allocator_info"] = info
    for q in budget.quantities:
        if compressed.get(q) > budget.limit(q, selection.original_cost) + 1e-9:
            raise BudgetError(f"internal error: the built model uses {compressed.get(q):,} {q}, over the budget "
                              f"{budget.limit(q, selection.original_cost):,.0f}; please report this")
    return CompressionResult(work, plan, report, allocation)


def input_notes(selection: Selection, built: Built) -> list[str]:
    """Report notes on what the MAC figures mean for this input, fused attention paths, and how much of
    the model no target covers (a whole-model budget squeezes the targets to make up for it)."""
    from .inputs import input_description, tokens_per_sample
    notes = []
    if selection.example is not None:
        desc = input_description(selection.example)
        tokens = tokens_per_sample(selection.example)
        per_token = (f"; {selection.original_cost.macs / tokens:,.0f} MACs per token in the original"
                     if tokens else "")
        notes.append(f"MACs are counted {desc} on the example inputs{per_token}")
    fused = [n for n, m in selection.model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    if fused:
        notes.append(f"{len(fused)} nn.TransformerEncoderLayer(s): MACs counted with PyTorch's fused fast path off "
                     "(FlopCounterMode cannot see inside it); compressed layers carry a forward hook that keeps their "
                     "encoder layer off the fused path, which would rebuild dense weights on every call")
    dense_targets = sum(t.dense_cost.params for t in selection.targets)
    rest = selection.original_cost.params - dense_targets
    if selection.original_cost.params and rest / selection.original_cost.params > 0.2:
        kinds = sorted({s.type for s in selection.skipped})[:6]
        notes.append(f"{100 * rest / selection.original_cost.params:.0f}% of the parameters are outside the "
                     f"compressed layers ({', '.join(kinds) or 'embeddings, norms'} ...): a whole-model params budget "
                     "is met by squeezing the rest harder")
    return notes


__all__ = ["Built", "Calibration", "CompressionResult", "Selection", "allocate", "build", "calibrate",
           "choose_allocator", "cost_table", "explicit_ranks", "finalize", "find_heads", "method_for", "select",
           "split_method_options", "WARN_DROP", "input_notes"]
