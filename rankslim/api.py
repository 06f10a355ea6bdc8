"""``compress()``: the one-call path through the stages of :mod:`rankslim.pipeline`.

select -> calibrate -> cost table -> allocate -> build -> finalize.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .allocate import Budget
from .decompose.svd import SOLVERS
from .errors import BudgetError, OptionError, RankslimError
from .pipeline import (CompressionResult, allocate, build, calibrate, choose_allocator, cost_table, finalize,
                       select, speed_aware as speed_aware_table, time_aware)
from .speed_mode import auto_decision, mac_only, speed_request


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
    keep_head: bool = True,
    round_to: int = 1,
    inplace: bool = False,
    data: Any = None,
    calib_samples: int = 256,
    calib_batch_size: int = 64,
    calib_memory_mib: float | None = None,
    sequential: bool = True,
    solver: str = "auto",
    seed: int = 0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    allocator_options: Mapping[str, Any] | None = None,
    method_options: Mapping[str, Any] | None = None,
    bn_recalibrate: bool = False,
    progress: bool = False,
    max_drop: float | str | None = None,
    eval_data: Any = None,
    finetune_epochs: int = 0,
    finetune_options: Mapping[str, Any] | None = None,
    example_inputs: Any = None,
    transform: Callable[[Any], Any] | None = None,
    speed_aware: bool | str | Mapping[str, Any] = "auto",
    latency: float | None = None,
) -> CompressionResult:
    """Compress ``model`` by replacing Conv2d/Linear layers with factorized ones.

    How much: exactly one of a budget (``params`` and/or ``macs``, fractions of the whole original
    model, MACs per sample as ``FlopCounterMode`` counts them at ``input_shape``), ``ratio``
    (rank / full rank per layer), ``energy`` (squared-singular-value fraction kept per layer) or
    ``ranks`` (an int for every layer, or ``{glob: rank}``).  Budgets are met by ``allocator``
    (default ``"cptv"``: bisection on one shared energy threshold).

    Which layers: ``include`` / ``exclude`` name globs, ``min_params``, ``keep_stem`` (leave
    convs with at most 3 input channels dense) and ``keep_head`` (default True: the output head — the
    classifier — stays dense; with False it never gets fewer ranks than its outputs unless ``ranks``
    says so); ``methods`` maps name
    globs to methods (others use ``method``).  Unsupported layers are skipped and listed in the
    report.  ``data`` (dataset name, Dataset or DataLoader) feeds data-aware methods and
    allocators with ``calib_samples`` inputs, run ``calib_batch_size`` at a time (the activations of one batch
    in flight are what calibration memory grows with; statistics are accumulated over batches, so a smaller
    batch bounds memory without changing the result beyond float64 rounding).  ``calib_memory_mib`` bounds the
    activations kept between layers (default 1024 MiB); past it batches are recomputed, so memory stops growing
    with ``calib_samples`` at a cost in time (``docs/results/calibration.md``).

    ``bn_recalibrate=True`` re-estimates BatchNorm running statistics of the compressed model on
    the calibration inputs (needs ``data``).

    ``method_options``: options of the default ``method`` (``{"damping": 1e-3}``), or per method
    (``{"grebdec": {"t": -1}}`` or ``{"grebdec.t": -1}``); ``allocator_options`` those of the allocator.
    Both are validated before any work starts (``rankslim methods`` lists them); unknown names fail.
    Allocators that return singular-value scales (COBLA) have them applied to the weight the method
    decomposes; ``allocator_options={"scale": False}`` keeps the plain truncation.

    Returns a :class:`CompressionResult` (model, plan, report, allocation); ``model`` is left
    untouched unless ``inplace=True``.
    ``input_shape`` is the per-sample shape, e.g. ``(3, 224, 224)``.  Models that do not take one
    float tensor get ``example_inputs`` instead: a tensor of any dtype (token ids ``(1, T)``), a tuple
    (positional inputs) or a dict (keyword inputs, e.g. ``input_ids`` / ``attention_mask``); MACs are
    then counted per sample on its first sample (per sequence of ``T`` tokens; the report also gives
    MACs per token).  Without either, the shape is taken from the first calibration sample of ``data``.
    ``transform`` maps each item (or DataLoader batch) of ``data`` to model inputs, as NNCF's
    ``Dataset(data, transform_fn)``.

    Speed-aware allocation times each layer's dense and factorized forms on this machine (cached on disk,
    :mod:`rankslim.latency_cache`) and factorizes a layer only at ranks where it is measurably faster (5% margin);
    budgets are still met exactly (MACs per sample, params).  ``speed_aware``:

    * ``"auto"`` (default): on only for a ``macs`` budget (not params-only, ``ratio``, ``energy``, ``ranks`` or
      ``max_drop``) on float32 CPU layers, and only when measuring is cheap — every timing already cached, or an
      estimate (each layer form's MACs × batch × calls at a conservative 4 GMAC/s plus a fixed cost per form,
      :func:`rankslim.speed_mode.estimate_measuring`) of at most 20 s.  If the speed-aware allocation cannot meet
      the budget it falls back to the MAC-only one.  ``$RANKSLIM_SPEED_AWARE=on|off`` overrides auto.
    * ``True`` (or options ``{"batch": 32, "threads": 4, "runtime": "onnxruntime", "margin": 0.05,
      "samples": 8}``): always measure; an infeasible budget raises :class:`BudgetError`.
    * ``False``: MAC-only.
    * ``{"mode": "auto", "max_seconds": 60, "batch": 32, ...}``: auto with another threshold / measuring options.

    Time-aware step (speed-aware MAC budgets with an allocator that meets budgets; ``{"time_aware": False}``
    skips it): the allocator's ranks are replaced by the allocation with the least measured time (layers timed
    alone, summed) that meets the same budget with no larger error proxy, the sum over layers of each layer's
    relative residual spectrum energy (``{"error_slack": 0.1}`` allows 10% more), solved exactly by a MILP
    (:mod:`rankslim.allocate.timed`).  ``report.metrics["allocation_mode"]["time_aware"]`` has both predictions.

    Whole-model check (speed-aware only; ``{"check": False}`` skips it): the built model is timed against the
    original on the same runtime / batch / threads (:mod:`rankslim.whole_model`).  When it is not faster, the
    margin is raised (15%, 30%, 50%: the layers with the smallest gains stay dense) and the model allocated and
    built again; the fastest model meeting the budget is kept.  If none is faster, ``speed_aware=True`` raises
    :class:`BudgetError` and auto keeps the budget-meeting model with a warning note.  With ``inplace=True`` the
    model is only timed and reported (no retries).  ``report.metrics["whole_model"]`` holds the timings.

    ``report.metrics["allocation_mode"]`` always says which was used: ``{"mode": "speed-aware", "runtime",
    "batch", "threads", ...}`` or ``{"mode": "mac-only", "reason": ...}`` (also a line of the report and of the
    CLI summary); with speed-aware allocation ``report.metrics["speed_aware"]`` holds the measurements and the
    layers never faster.

    Latency budget: ``latency=0.5`` asks for a model whose MEASURED forward time is at most that fraction of the
    original's, timed on ``speed_aware``'s ``runtime`` / ``batch`` / ``threads`` (default eager, batch 1, the current
    ``torch.get_num_threads()``; e.g. ``speed_aware={"runtime": "onnxruntime", "batch": 32}``).  Each target layer
    is timed alone at sampled ranks (cached) and the whole model once; the model's time is taken to be the sum of
    its layers' plus a fixed rest (:mod:`rankslim.latency_budget`), the allocator meets the fraction on that
    model and ranks are snapped to the fastest measured rank at or above them.  Combines with ``params`` or with
    ``macs`` (both hold: ``macs=0.5, latency=0.5`` is the least-error model that keeps half the MACs and is predicted
    to take half the time); not with both, nor ``ratio``, ``energy``, ``ranks``, ``max_drop``, ``example_inputs``
    or ``speed_aware=False``.  A fraction below the smallest the measurements allow raises :class:`BudgetError`
    naming that smallest.  The built model is timed again: ``report.metrics["latency"]`` holds ``requested``,
    ``predicted`` and ``measured`` fractions (a measured one above the request beyond noise is a warning note,
    timings being noisy); ``report.metrics["allocation_mode"]["mode"]`` is ``"latency budget"``.

    Accuracy target: ``max_drop=0.01`` (or ``"1%"``) returns the SMALLEST budget (fraction of ``params``, or
    of ``macs`` when ``macs=`` is given; a given fraction is the largest allowed) whose model loses at most
    that much top-1 accuracy on a held-out part of the TRAINING data (``eval_data``, else 10 % of ``data``)
    — see :func:`rankslim.target.compress_within_drop`; ``report.metrics["max_drop_search"]`` lists what was
    tried.  ``finetune_epochs=N`` fine-tunes the result (every candidate, with ``max_drop``) on ``data``,
    distilling from the original; ``finetune_options`` go to :func:`rankslim.finetune`.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    spec_str: str | None = None
    dataset_name: str | None = None
    request = speed_request(speed_aware)  # validated (and the environment read) before any work
    latency_opts = None
    if latency is not None:
        from .latency_budget import check_request
        latency_opts = check_request(latency, speed_aware, request, params=params, macs=macs, ratio=ratio,
                                     energy=energy, ranks=ranks, max_drop=max_drop, example_inputs=example_inputs)
    if isinstance(model, str):
        from .zoo import resolve_model
        ms = resolve_model(model)
        spec_str, dataset_name = ms.spec, ms.dataset
        model = ms.model
        input_shape = input_shape or ms.input_shape
    if input_shape is None and example_inputs is None and data is not None and not isinstance(data, str):
        # the model's input is whatever the data yields: its first sample is the example
        from .data import calibration_batches
        example_inputs = calibration_batches(data, 1, seed=seed, transform=transform)[0]
    if input_shape is None and example_inputs is None:
        raise RankslimError("input_shape is needed to count MACs: pass the per-sample shape, e.g. input_shape=(3, 224, 224), "
                            "or example_inputs (token ids of shape (1, T), a tuple or a dict of tensors), or data")
    if ranks is not None and request.explicit and request.mode == "on":
        raise OptionError("speed_aware=True chooses ranks under a budget, but ranks= fixes every rank: drop one of "
                          "them (or give a macs/params budget instead of ranks)")
    if calib_memory_mib is not None and (isinstance(calib_memory_mib, bool)
                                         or not isinstance(calib_memory_mib, (int, float)) or not calib_memory_mib >= 0):
        raise OptionError(f"calib_memory_mib is the MiB of activations calibration may keep (>= 0), got "
                          f"{calib_memory_mib!r}")
    if isinstance(calib_batch_size, bool) or not isinstance(calib_batch_size, int) or calib_batch_size < 1:
        raise OptionError(f"calib_batch_size must be a positive integer (samples per calibration pass), got "
                          f"{calib_batch_size!r}")
    calib_cache_bytes = None if calib_memory_mib is None else int(calib_memory_mib * 2**20)
    if solver not in SOLVERS:
        raise OptionError(f"unknown SVD solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if max_drop is not None:
        if ratio is not None or energy is not None or ranks is not None or inplace:
            raise OptionError("max_drop searches a params/macs budget: it cannot be combined with ratio, energy, "
                              "ranks or inplace=True")
        if request.explicit and request.mode == "on":
            raise OptionError("speed_aware is not combined with max_drop yet: run the accuracy search, then "
                              "compress at the budget it found with speed_aware=True")
        if example_inputs is not None or transform is not None:
            raise OptionError("max_drop searches models that take one image tensor for now: example_inputs and "
                              "transform cannot be combined with it yet")
        from .target import compress_within_drop
        found = compress_within_drop(
            model, input_shape, max_drop=max_drop, method=method, params=params, macs=macs, allocator=allocator,
            allocator_options=allocator_options, methods=methods, method_options=method_options, include=include,
            exclude=exclude, min_params=min_params, keep_stem=keep_stem, keep_head=keep_head, round_to=round_to,
            data=data, eval_data=eval_data, calib_samples=calib_samples, calib_batch_size=calib_batch_size,
            calib_cache_bytes=calib_cache_bytes,
            sequential=sequential, solver=solver,
            seed=seed, eval_fn=eval_fn, bn_recalibrate=bn_recalibrate, finetune_epochs=finetune_epochs,
            finetune_options=finetune_options, progress=progress, spec=spec_str, dataset=dataset_name)
        found.report.metrics["allocation_mode"] = mac_only(
            f"turned off ({request.source})" if request.mode == "off" else
            "max_drop search: the accuracy search allocates without timings (speed-aware is not combined with it "
            "yet)", request)
        return found
    if eval_data is not None:
        raise OptionError("eval_data is the held-out data of a max_drop search: pass max_drop=... too")
    budget = Budget(params=params, macs=macs)
    # every option is validated before any work starts (a latency budget is allocated as the MAC slot of a time
    # table, so the allocator is chosen for params + "macs")
    alloc = choose_allocator(budget if latency is None else Budget(params=params if macs is None else macs,
                                                                   macs=latency), ratio, energy, ranks,
                             allocator, allocator_options)
    if latency is not None and alloc.budget != "required":
        raise OptionError(f"the {alloc.name} allocator does not meet a budget; a latency budget needs one that does "
                          "(default cptv)")
    was_training = model.training

    sel = select(model, input_shape, method, methods=methods, method_options=method_options, include=include,
                 exclude=exclude, min_params=min_params, keep_stem=keep_stem, keep_head=keep_head, inplace=inplace,
                 spec=spec_str, dataset=dataset_name, example_inputs=example_inputs)
    timings["select"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    wants_batches = bn_recalibrate or (alloc is not None and alloc.needs_context)
    cal = calibrate(sel, data, calib_samples=calib_samples, batch_size=calib_batch_size, sequential=sequential,
                    seed=seed, want_batches=wants_batches, transform=transform,
                    cache_limit_bytes=calib_cache_bytes)
    timings["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = cost_table(sel, cal, quantities=budget.quantities if latency is None else
                       list(dict.fromkeys([*budget.quantities, "macs"])),
                       round_to=round_to, keep_head=keep_head)
    plain_table, check, estimate = table, None, None
    latency_model = None
    fixed_by = next((n for n, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None),
                    alloc.name if alloc is not None and not budget.is_set() else None)
    mode: dict[str, Any] | None = None
    if latency is not None:
        from .latency_budget import allocate_latency, latency_model as measure_latency_model
        latency_model = measure_latency_model(sel, table, **latency_opts)
        timings["speed_measure"] = latency_model.seconds
        allocation = allocate_latency(sel, latency_model, alloc, latency, params=params, macs=macs, calibration=cal,
                                      seed=seed, solver=solver, eval_fn=eval_fn)
        mode = {"mode": "latency budget", "latency": latency, **({"macs": macs} if macs is not None else {}),
                "predicted": latency_model.fraction(allocation),
                "smallest": latency_model.smallest, "runtime": latency_model.runtime, "batch": latency_model.batch,
                "threads": latency_model.threads, "measure_seconds": round(latency_model.seconds, 3)}
    elif request.mode == "off":
        mode = mac_only(f"turned off ({request.source})", request)
    elif ranks is not None:  # only the environment's "on" or auto get here: explicit ranks leave nothing to time
        mode = mac_only("no MAC budget (ranks fixes the ranks)", request)
    elif request.mode == "auto":
        reason, estimate = auto_decision(request, sel, table, macs_budget=budget.macs is not None, fixed_by=fixed_by,
                                         params_budget=budget.params is not None)
        if reason is not None:
            mode = mac_only(reason, request)
    if mode is None:
        t_measure = time.perf_counter()
        try:
            table, check = speed_aware_table(sel, table, **request.measure_options)
        except Exception as exc:
            # auto mode was not asked for: a layer form that cannot be timed (a method without a rank-only
            # structure, an export failure) must not fail the compression, only the speed-aware part of it
            if request.mode == "on":
                raise
            mode = mac_only(f"measuring failed ({type(exc).__name__}: {exc})", request)
        timings["speed_measure"] = time.perf_counter() - t_measure
    if latency_model is None:  # the latency budget allocated above
        try:
            allocation = allocate(sel, table, alloc, budget, ranks=ranks, calibration=cal, seed=seed, solver=solver,
                                  eval_fn=eval_fn)
        except BudgetError as exc:
            if check is None:
                raise
            never = sum(1 for lo in table.layers if not any(lo.faster(r) for r in (1, lo.max_rank)))
            detail = (f"{never} of {len(table.layers)} layer(s) were measured no faster factorized at batch "
                      f"{check.batch}, so they stay dense")
            if request.mode == "on":
                raise BudgetError(f"{exc} Speed-aware: {detail}; try a larger --speed-batch, a larger budget, or "
                                  "MAC-only allocation (--mac-only, speed_aware=False).") from None
            # auto: the user asked for a budget, not for speed-aware mode; the MAC-only allocation still meets it
            mode = mac_only(f"speed-aware budget infeasible: {detail} and the budget cannot be met that way", request)
            table, check = plain_table, None
            allocation = allocate(sel, table, alloc, budget, ranks=ranks, calibration=cal, seed=seed, solver=solver,
                                  eval_fn=eval_fn)
    if check is not None and _time_aware_applies(request, alloc, budget):
        allocation = time_aware(table, allocation, check, budget, slack=request.error_slack)
    timings["allocate"] = time.perf_counter() - t0 - timings.get("speed_measure", 0.0)

    t0 = time.perf_counter()
    whole: dict[str, Any] | None = None
    if check is not None and request.check:
        built, allocation, table, check, whole = _checked_build(
            sel, allocation, cal, table, plain_table, check, alloc, budget, request, inplace=inplace, seed=seed,
            solver=solver, progress=progress, eval_fn=eval_fn)
        timings["whole_model_check"] = whole["seconds"]
    else:
        built = build(sel, allocation, cal, seed=seed, solver=solver, progress=progress, inplace=True)
        if (mode is not None and mode["mode"] == "mac-only" and request.mode == "auto" and request.check
                and budget.macs is not None and not inplace):
            # auto chose not to measure (too slow, infeasible, failed): still say whether the result is faster
            whole = _time_mac_only(sel, built, request)
            timings["whole_model_check"] = whole["seconds"]
    timings["decompose"] = time.perf_counter() - t0 - timings.get("whole_model_check", 0.0)
    timings["total"] = time.perf_counter() - t_start
    # a latency budget alone leaves MACs free (the time model holds them); params or macs given with it hold exactly
    result = finalize(sel, built, allocation, cal, budget=budget, method=method,
                      budget_request={"params": params, "macs": macs, "ratio": ratio, "energy": energy,
                                      **({"latency": latency} if latency is not None else {})},
                      bn_recalibrate=bn_recalibrate, timings=timings, was_training=was_training)
    if latency_model is not None:
        from .latency_budget import record_latency
        # after inplace=True the original is gone: its cost-model measurement stands in
        record_latency(result.report, latency_model, result.model, allocation, latency,
                       original=None if inplace else sel.original, input_shape=sel.input_shape)
    if check is not None:
        slow = [lo.name for lo in table.layers if allocation.get(lo.name) is None and lo.faster is not None
                and not any(lo.faster(r) for r in range(1, lo.max_rank + 1, max(1, lo.max_rank // 32)))]
        result.report.notes.append(
            f"speed-aware ({check.runtime}, batch {check.batch}, {check.threads} thread(s)): a layer is factorized only "
            f"at ranks measured at least {check.margin:.0%} faster than dense; {len(slow)} layer(s) were not faster "
            f"at any rank and stay dense" + (f": {', '.join(slow[:8])}{' ...' if len(slow) > 8 else ''}" if slow else ""))
        result.report.metrics["speed_aware"] = {"runtime": check.runtime, "batch": check.batch,
                                                "threads": check.threads, "margin": check.margin,
                                                "never_faster": slow, "measured_ms": check.measured}
        mode = {"mode": "speed-aware", "runtime": check.runtime, "batch": check.batch, "threads": check.threads,
                "margin": check.margin, "requested": request.mode, "source": request.source,
                "measure_seconds": round(timings.get("speed_measure", 0.0), 3)}
        if estimate is not None:
            mode.update(estimated_s=round(estimate.seconds, 3), to_measure=estimate.to_measure,
                        cached=estimate.cached)
        ta = getattr(allocation, "info", {}).get("time_aware")
        if ta is not None:
            mode["time_aware"] = {k: ta[k] for k in ("time_aware", "predicted_ms", "reference_ms", "solution_ms",
                                                     "error", "reference_error", "slack", "min_gain",
                                                     "changed_layers") if k in ta}
        elif not request.time_aware:
            mode["time_aware"] = {"time_aware": "off"}
    if whole is not None:
        result.report.metrics["whole_model"] = whole
        result.report.notes.extend(whole["notes"])
        if whole.get("chosen"):
            mode["whole_model_speedup"] = round(whole["chosen"]["speedup"], 3)
            if whole["chosen"]["margin"] is not None:
                mode["margin"] = whole["chosen"]["margin"]
    result.report.metrics["allocation_mode"] = mode
    if finetune_epochs:
        from .target import finetune_compressed
        finetune_compressed(result, sel.original, data if data is not None else dataset_name, finetune_epochs,
                            finetune_options, seed=seed, progress=progress)
    return result


def _timing_example(sel) -> Any:
    """One sample to time whole models on: the selection's example, random where it is a float tensor (zeros or a
    constant would make activations sparse and flatter the timings)."""
    from .bench import make_example
    ex = sel.example
    if ex is None or (isinstance(ex, torch.Tensor) and ex.is_floating_point()):
        ex = make_example(sel.input_shape, 1)
    return ex


def _ort_untimeable(runtime: str, ex: Any) -> dict[str, Any] | None:
    """The ``whole_model`` record of a check that cannot run (onnxruntime needs one tensor input), else None."""
    if runtime == "onnxruntime" and not isinstance(ex, torch.Tensor):
        return {"tried": [], "chosen": None, "seconds": 0.0,
                "notes": ["whole-model check skipped: onnxruntime timing takes models with one tensor input"]}
    return None


def _time_mac_only(sel, built, request) -> dict[str, Any]:
    """Time a MAC-only model that auto mode fell back to against the original (no retries: the layers were never
    measured), so the report says when it is slower.  The ``report.metrics["whole_model"]`` record."""
    from .whole_model import compare_models, describe
    t0 = time.perf_counter()
    m = request.measuring
    ex = _timing_example(sel)
    skipped = _ort_untimeable(m["runtime"], ex)
    if skipped is not None:
        return skipped
    t = compare_models(sel.original, built.model, ex, runtime=m["runtime"], batch=m["batch"], threads=m["threads"],
                       margin=None)
    notes = [] if t.faster else [
        f"warning: {describe(t)}: this MAC-only model is not faster than the original (auto mode did not measure "
        "the layers); speed_aware=True (--speed-aware) factorizes only layers measured faster"]
    return {"tried": [t.to_dict()], "chosen": t.to_dict(), "notes": notes, "seconds": time.perf_counter() - t0}


def _time_aware_applies(request, alloc, budget: Budget) -> bool:
    """The time-aware step runs after allocators that meet a MAC budget, unless turned off: a rank rule (vbmf,
    gavish-donoho) fixes ranks by itself and only has its budget checked."""
    return request.time_aware and alloc is not None and alloc.budget == "required" and budget.macs is not None


def _checked_build(sel, allocation, cal, table, plain_table, check, alloc, budget, request, *, inplace: bool,
                   seed: int, solver: str, progress: bool, eval_fn) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """Build the speed-aware allocation and time it against the original (:mod:`rankslim.whole_model`); when it is
    not faster, raise the margin, allocate and build again.  Returns ``(built, allocation, table, check, whole)``
    of the model kept (the fastest that meets the budget) and the ``report.metrics["whole_model"]`` record.
    Raises :class:`BudgetError` when ``speed_aware=True`` and no built model is faster."""
    from .pipeline import speed_aware as speed_table
    from .whole_model import compare_models, describe, margins_after, time_models, timing
    t0 = time.perf_counter()
    building = [0.0]  # decomposition time: reported as "decompose", not as the check's

    def build_timed(allocation, inplace_build: bool):
        tb = time.perf_counter()
        out = build(sel, allocation, cal, seed=seed, solver=solver, progress=progress, inplace=inplace_build)
        building[0] += time.perf_counter() - tb
        return out

    def seconds() -> float:
        return time.perf_counter() - t0 - building[0]
    ex = _timing_example(sel)
    timed_on = dict(runtime=check.runtime, batch=check.batch, threads=check.threads)
    notes: list[str] = []
    skipped = _ort_untimeable(check.runtime, ex)
    if skipped is not None:
        return build_timed(allocation, True), allocation, table, check, {**skipped, "seconds": seconds()}
    if inplace:  # the original is about to be modified: time it first, then the built model, no retries
        (orig_ms,), _ = time_models([sel.model], ex, **timed_on)
        built = build_timed(allocation, True)
        (comp_ms,), calls = time_models([built.model], ex, **timed_on)
        t = timing(orig_ms, comp_ms, margin=check.margin, calls=calls, **timed_on)
        if not t.faster:
            notes.append(f"warning: {describe(t)}: slower than the original (inplace=True: not re-allocated; "
                         "compress a copy to let rankslim raise the margin, or use speed_aware=False)")
        return built, allocation, table, check, {"tried": [t.to_dict()], "chosen": t.to_dict(), "notes": notes,
                                                 "seconds": seconds()}
    tried: list[tuple[Any, Any, Any, Any, Any]] = []
    margin = check.margin
    while True:
        built = build_timed(allocation, False)
        t = compare_models(sel.original, built.model, ex, margin=margin, **timed_on)
        tried.append((t, built, allocation, table, check))
        if t.faster:
            break
        nxt = margins_after(margin)
        if not nxt:
            break
        margin = nxt[0]
        table, check = speed_table(sel, plain_table, **{**request.measure_options, "margin": margin})
        try:
            allocation = allocate(sel, table, alloc, budget, calibration=cal, seed=seed, solver=solver,
                                  eval_fn=eval_fn)
            if _time_aware_applies(request, alloc, budget):
                allocation = time_aware(table, allocation, check, budget, slack=request.error_slack)
        except BudgetError:
            notes.append(f"whole-model check: at a {margin:.0%} layer margin the budget cannot be met")
            break
    t, built, allocation, table, check = max(tried, key=lambda c: c[0].speedup)
    record = {"tried": [c[0].to_dict() for c in tried], "chosen": t.to_dict(), "notes": notes}
    if len(tried) > 1:
        notes.append("whole-model check: " + "; ".join(f"margin {c[0].margin:.0%}: {c[0].speedup:.2f}x"
                                                       for c in tried) + f"; kept margin {t.margin:.0%}")
    if not t.faster:
        if request.mode == "on":
            raise BudgetError(f"speed-aware: no allocation that meets the budget was measured faster than the "
                              f"original as a whole model (best: {describe(t)}); give a larger budget, another "
                              "--speed-batch, or MAC-only allocation (--mac-only, speed_aware=False)")
        notes.append(f"warning: {describe(t)}: slower than the original although each factorized layer was faster "
                     "alone; a larger budget or MAC-only allocation may do better")
    else:
        notes.append(f"whole-model check: {describe(t)}")
    record["seconds"] = seconds()
    return built, allocation, table, check, record


__all__ = ["CompressionResult", "compress"]
