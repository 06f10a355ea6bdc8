"""``compress()``: select -> calibrate -> allocate -> decompose -> build -> swap -> report."""
from __future__ import annotations

import fnmatch
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .allocate import ALLOCATORS, Budget, CostTable, LayerOption
from .allocate.base import AllocationContext, Ranks
from .decompose.svd import LARGE_MIN_ENTRIES
from .cost import Cost, flop_counter_macs, model_cost, trace_shapes
from .errors import BudgetError, RankError, RankslimError
from .methods import DecomposeContext, Method, get_method
from .plan import LayerPlan, Plan, attach_plan
from .report import LayerRow, Report
from .surgery import Skipped, Target, check_finite, replace_modules, select_targets, working_copy


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed ``model`` (plan attached), its ``plan`` and ``report``."""

    model: nn.Module
    plan: Plan
    report: Report


def _method_for(name: str, default: str, per_layer: Mapping[str, str] | None) -> str:
    """Method of layer ``name``: the first matching glob in ``per_layer``, else ``default``."""
    for pattern, m in (per_layer or {}).items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return m
    return default


def _choose_allocator(params, macs, ratio, energy, ranks, allocator) -> str:
    modes = [n for n, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None]
    if len(modes) > 1:
        raise BudgetError(f"choose one of ratio / energy / ranks, not {' and '.join(modes)}")
    if modes:
        if params is not None or macs is not None:
            raise BudgetError(f"{modes[0]} fixes every rank; it cannot be combined with a params/macs budget")
        return modes[0]
    if params is None and macs is None and allocator is None:
        raise BudgetError("say how much to compress: a budget (params=F and/or macs=F), ratio=F, energy=F, ranks={...} "
                          "or a budget-free allocator (allocator='vbmf' or 'gavish-donoho')")
    # an allocator without a budget is allowed: rank rules (vbmf, gavish-donoho) need none, the others refuse
    return allocator or "cptv"


def _explicit_ranks(table: CostTable, ranks: int | Mapping[str, int]) -> Ranks:
    out: Ranks = {}
    names = table.by_name()
    if isinstance(ranks, Mapping):
        unknown = [k for k in ranks if not any(fnmatch.fnmatchcase(n, k) for n in names)]
        if unknown:
            raise RankError(f"no target layer matches {unknown}; targets are: {', '.join(names)}")
    for lo in table.layers:
        r = ranks if isinstance(ranks, int) else next(
            (v for k, v in ranks.items() if fnmatch.fnmatchcase(lo.name, k)), None)
        if r is None:
            out[lo.name] = None
            continue
        if not 1 <= int(r) <= lo.max_rank:
            raise RankError(f"rank {r} is impossible for layer {lo.name!r}: it must lie in [1, {lo.max_rank}] "
                            f"(min(m, k) of its {lo.method} factorization)")
        out[lo.name] = int(r)
    return out


def compress(
    model: nn.Module | str,
    method: str = "svd",
    *,
    params: float | None = None,
    macs: float | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    ranks: int | Mapping[str, int] | None = None,
    allocator: str | None = None,
    methods: Mapping[str, str] | None = None,
    input_shape: Iterable[int] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_params: int = 0,
    keep_stem: bool = False,
    round_to: int = 1,
    inplace: bool = False,
    data: Any = None,
    calib_samples: int = 256,
    sequential: bool = True,
    solver: str = "auto",
    seed: int = 0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    allocator_options: Mapping[str, Any] | None = None,
    method_options: Mapping[str, Any] | None = None,
    bn_recalibrate: bool = False,
    progress: bool = False,
) -> CompressionResult:
    """Compress ``model`` by replacing Conv2d/Linear layers with factorized ones.

    How much: exactly one of a budget (``params`` and/or ``macs``, fractions of the whole original
    model, MACs per sample as ``FlopCounterMode`` counts them at ``input_shape``), ``ratio``
    (rank / full rank per layer), ``energy`` (squared-singular-value fraction kept per layer) or
    ``ranks`` (an int for every layer, or ``{glob: rank}``).  Budgets are met by ``allocator``
    (default ``"cptv"``: bisection on one shared energy threshold).

    Which layers: ``include`` / ``exclude`` name globs, ``min_params`` and ``keep_stem`` (leave
    convs with at most 3 input channels dense); ``methods`` maps name
    globs to methods (others use ``method``).  Unsupported layers are skipped and listed in the
    report.  ``data`` (dataset name, Dataset or DataLoader) feeds data-aware methods and
    allocators with ``calib_samples`` inputs.

    ``bn_recalibrate=True`` re-estimates BatchNorm running statistics of the compressed model on
    the calibration inputs (needs ``data``).

    Allocators that return singular-value scales (COBLA) have them applied to the weights before the
    factorization; ``allocator_options={"scale_weights": False}`` keeps the plain truncation.

    Returns a :class:`CompressionResult`; ``model`` is left untouched unless ``inplace=True``.
    ``input_shape`` is the per-sample shape, e.g. ``(3, 224, 224)``.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    spec_str: str | None = None
    dataset_name: str | None = None
    if isinstance(model, str):
        from .zoo import resolve_model
        ms = resolve_model(model)
        spec_str, dataset_name = ms.spec, ms.dataset
        model = ms.model
        input_shape = input_shape or ms.input_shape
    if input_shape is None:
        raise RankslimError("input_shape is needed to count MACs: pass the per-sample shape, e.g. input_shape=(3, 224, 224)")
    input_shape = tuple(int(s) for s in input_shape)
    if round_to < 1:
        raise RankError(f"round_to must be >= 1, got {round_to}")
    alloc_name = _choose_allocator(params, macs, ratio, energy, ranks, allocator)
    if alloc_name not in ALLOCATORS and alloc_name != "ranks":
        raise BudgetError(f"unknown allocator {alloc_name!r}; available: {', '.join(sorted(ALLOCATORS))}")
    budget = Budget(params=params, macs=macs)
    check_finite(model)

    # select
    work = working_copy(model, inplace)
    was_training = work.training
    shapes = trace_shapes(work, input_shape)
    targets, skipped = select_targets(work, shapes, include, exclude, min_params, keep_stem)
    chosen: dict[str, Method] = {}
    kept_targets: list[Target] = []
    for t in targets:
        m = get_method(_method_for(t.name, method, methods))
        why = m.supports(t)
        if why:
            skipped.append(Skipped(t.name, type(t.module).__name__, f"{m.name}: {why}"))
            continue
        chosen[t.name] = m
        kept_targets.append(t)
    targets = kept_targets
    if not targets:
        raise RankslimError("no layer can be compressed: " + (
            "; ".join(f"{s.name}: {s.reason}" for s in skipped[:10]) or "the model has no Conv2d/Linear layer"))

    # calibrate (only when a method or allocator asks for data)
    batches: list[torch.Tensor] = []
    needs_data = any(m.needs_data for m in chosen.values())
    if data is None and dataset_name is not None and (needs_data or bn_recalibrate):
        data = dataset_name
    if data is not None:
        from .data import calibration_batches
        batches = calibration_batches(data, calib_samples, seed=seed)
    calibrator = None
    if needs_data:
        if not batches:
            raise RankslimError("the chosen method needs calibration data: pass data=... (dataset name, Dataset or DataLoader)")
        from .calibrate import Calibrator
        calibrator = Calibrator(model, batches, sequential=sequential, seed=seed,
                                names=[t.name for t in targets if chosen[t.name].needs_data])
    timings["select"] = time.perf_counter() - t_start

    # allocate
    t0 = time.perf_counter()
    fcm_macs = flop_counter_macs(work, input_shape)
    base = model_cost(work, input_shape, shapes)
    original = Cost(base.total.params, fcm_macs)
    quantities = tuple(budget.quantities) or ("params",)
    options = [LayerOption(t.name, chosen[t.name].max_rank(t), t.dense_cost,
                           (lambda r, t=t, m=chosen[t.name]: m.cost(t, r)), chosen[t.name].spectrum(t),
                           chosen[t.name].name) for t in targets]
    table = CostTable(options, original, round_to=round_to, quantities=quantities)
    if alloc_name == "ranks":
        rank_of = _explicit_ranks(table, ranks)  # type: ignore[arg-type]
    else:
        fn = ALLOCATORS[alloc_name]
        kwargs = dict(allocator_options or {})
        # consumed here, not by the allocator: whether allocator scales (COBLA's m_hat) reach the weights
        scale_weights = bool(kwargs.pop("scale_weights", True))
        if alloc_name == "ratio":
            kwargs["ratio"] = ratio
        if alloc_name == "energy":
            kwargs["energy"] = energy
        if "context" in inspect.signature(fn).parameters:
            kwargs["context"] = AllocationContext(
                work, targets, {n: m.name for n, m in chosen.items()}, batches, input_shape, seed, eval_fn,
                build=lambda rk: _build(work, targets, chosen, rk, seed, solver, method_options, calibrator, False)[0])
        rank_of = fn(table, budget, **kwargs)
    timings["allocate"] = time.perf_counter() - t0
    notes: list[str] = []
    alloc_info = dict(getattr(rank_of, "info", {}) or {})
    if alloc_name != "ranks" and scale_weights and getattr(rank_of, "scales", None):
        # COBLA's P <- m_hat * P: the kept singular values are rescaled before the factorization
        from .allocate.masked import apply_allocation_weights
        changed = apply_allocation_weights(targets, {n: m.name for n, m in chosen.items()}, rank_of)
        notes.append(f"{alloc_name}: singular values of {len(changed)} layer(s) rescaled by the allocator's masks")

    # decompose, build, swap
    t0 = time.perf_counter()
    work, layer_plans, rows = _build(work, targets, chosen, rank_of, seed, solver, method_options, calibrator,
                                     progress, inplace=True)
    timings["decompose"] = time.perf_counter() - t0
    if bn_recalibrate:
        if not batches:
            raise RankslimError("bn_recalibrate needs calibration inputs: pass data=... (dataset name, Dataset or DataLoader)")
        from .bn import recalibrate_bn
        t0 = time.perf_counter()
        n_bn = recalibrate_bn(work, batches)
        timings["bn_recalibrate"] = time.perf_counter() - t0
        notes.append(f"BatchNorm statistics of {n_bn} layers re-estimated on {sum(len(b) for b in batches)} calibration inputs")
    work.train(was_training)

    # report
    plan = Plan(layer_plans, model_spec=spec_str, input_shape=list(input_shape))
    attach_plan(work, plan)
    after = model_cost(work, input_shape)
    compressed = Cost(after.total.params, after.total.macs + (fcm_macs - base.total.macs))
    sparse_note = next((r.info["sparse_note"] for r in rows if r.info.get("sparse_note")), None)
    if sparse_note:
        notes.append(str(sparse_note))
    solvers = sorted({str(r.info.get("solver")) for r in rows if r.info.get("solver")})
    if solvers:
        notes.append(f"SVD solver(s) used: {', '.join(solvers)} (matrices with at least {LARGE_MIN_ENTRIES:,} entries "
                     "use the randomized range finder for ranks under 10% of the smaller side, else the Gram "
                     "eigendecomposition; smaller ones an exact SVD)")
    timings["total"] = time.perf_counter() - t_start
    report = Report(rows=rows, skipped=[s.__dict__ for s in skipped], original=original, compressed=compressed,
                    budget={"params": params, "macs": macs, "ratio": ratio, "energy": energy},
                    allocator=alloc_name, method=method, input_shape=list(input_shape), seconds=timings, notes=notes)
    if alloc_info:
        report.metrics["allocator_info"] = alloc_info
    for q in budget.quantities:
        if compressed.get(q) > budget.limit(q, original) + 1e-9:
            raise BudgetError(f"internal error: the built model uses {compressed.get(q):,} {q}, over the budget "
                              f"{budget.limit(q, original):,.0f}; please report this")
    return CompressionResult(work, plan, report)


def _build(work: nn.Module, targets: list[Target], chosen: Mapping[str, Method], rank_of: Ranks, seed: int,
           solver: str, method_options: Mapping[str, Any] | None, calibrator: Any, progress: bool,
           inplace: bool = False) -> tuple[nn.Module, list[LayerPlan], list[LayerRow]]:
    """Decompose every target with a rank and swap it into ``work`` (a copy unless ``inplace``).

    Targets are handled in forward order and swapped one by one, so a sequential calibrator sees
    the earlier layers already compressed.
    """
    if not inplace:
        work = working_copy(work)
        targets = [Target(t.name, work.get_submodule(t.name), t.kind, t.in_shape, t.out_shape) for t in targets]
    gen = torch.Generator().manual_seed(seed)
    plans: list[LayerPlan] = []
    rows: list[LayerRow] = []
    bar = None
    if progress:
        from rich.progress import Progress
        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("decomposing", total=len(targets))
    try:
        for t in targets:
            m = chosen[t.name]
            r = rank_of.get(t.name)
            dense = t.dense_cost
            if r is None:
                rows.append(LayerRow(t.name, type(t.module).__name__, t.describe_shape(), "dense", "full",
                                     dense.params, dense.params, dense.macs, dense.macs))
            else:
                t0 = time.perf_counter()
                stats = (calibrator.stats_for(t, work, raw=getattr(m, "needs_raw", False))
                         if (calibrator is not None and m.needs_data) else None)
                ctx = DecomposeContext(generator=gen, solver=solver, stats=stats, options=dict(method_options or {}))
                layer, info = m.decompose(t, r, ctx)
                replace_modules(work, {t.name: layer})
                # measured on the built layer: a method may build below the planned rank (elbow rules)
                c = model_cost(layer, t.in_shape).total
                rank_str = str(info.get("ranks", info.get("rank", r)))
                rows.append(LayerRow(t.name, type(t.module).__name__, t.describe_shape(), m.name, rank_str,
                                     dense.params, c.params, dense.macs, c.macs, info,
                                     time.perf_counter() - t0))
                plans.append(LayerPlan(t.name, m.name, info, type(t.module).__name__))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return work, plans, rows
