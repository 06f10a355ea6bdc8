"""Accuracy targets: the smallest budget whose compressed (optionally fine-tuned) model stays within a drop.

``compress(model, max_drop=0.01, data=...)`` comes here.  The search is pure orchestration over
:mod:`rankslim.pipeline`: ``select``, ``calibrate`` and ``cost_table`` run ONCE; each candidate budget then
costs one ``allocate`` (the allocator sees the same cost table and spectra), one ``build(inplace=False)`` on a
fresh copy, ``finalize`` (BatchNorm re-estimation, report) and, with ``finetune_epochs``, a short fine-tune
from the original model.  Candidates are bisected over the budget fraction of ONE quantity (params by
default, or the one the user named with ``params=`` / ``macs=``, whose value is then the largest budget the
search may return).  Accuracy is measured on a held-out split of the TRAINING data (``val_fraction`` of
``data``, or ``eval_data`` when given); the test split is never read.

AIMET's and NNCF's accuracy-aware modes sweep every layer's rank/ratio and evaluate the model per layer and
per candidate (O(layers × candidates) evaluations); here the allocator spreads each candidate budget over the
layers, so the whole search is O(log(1 / tol)) evaluations.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

from torch import nn
from torch.utils.data import DataLoader, Dataset

from .allocate import Budget
from .errors import BudgetError, DataError, OptionError
from .pipeline import (CompressionResult, allocate, build, calibrate, choose_allocator, cost_table, finalize,
                       select)

#: default absolute resolution of the search in budget fraction (0.01 = one percent of the original model)
DEFAULT_TOL = 0.01
#: default cap on the number of candidate budgets evaluated (the upper end included)
DEFAULT_MAX_EVALS = 10


def parse_drop(value: Any) -> float:
    """The accuracy drop a user asked for as a fraction in ``[0, 1)``.

    Accepts a number (``0.01``) or a string: ``"0.01"`` or a percentage ``"1%"`` (= 0.01).  Anything
    negative, at least 1 (100 %), NaN or unreadable is refused with one :class:`BudgetError`.
    """
    text = str(value).strip()
    try:
        if isinstance(value, str) and text.endswith("%"):
            drop = float(text[:-1]) / 100.0
        elif isinstance(value, bool):
            raise ValueError
        else:
            drop = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"max_drop must be a fraction like 0.01 or a percentage like 1%, got {value!r}") from None
    if not (0.0 <= drop < 1.0):  # also refuses NaN
        raise BudgetError(f"max_drop is the largest accuracy drop allowed, a fraction in [0, 1) (0.01 = 1 point), "
                          f"got {value!r}")
    return drop


def _labelled(ds: Dataset, what: str) -> None:
    """Refuse data whose items are not ``(input, label)`` pairs: accuracy needs labels."""
    try:
        item = ds[0]
    except Exception as exc:  # noqa: BLE001  (any indexing failure means we cannot read it)
        raise DataError(f"{what} cannot be read as (input, label) pairs: {exc}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise DataError(f"{what} must hold (input, label) pairs to measure accuracy, got items of type "
                        f"{type(item).__name__}")


def held_out(data: Any, eval_data: Any, val_fraction: float, seed: int) -> tuple[Any, Dataset]:
    """``(data to calibrate/fine-tune on, held-out labelled data to measure accuracy on)``.

    With ``eval_data`` (a ``Dataset``/``DataLoader`` of ``(x, y)``) it is the held-out set and ``data`` is used
    whole; otherwise ``val_fraction`` of ``data``'s TRAINING split is held out with a seeded permutation
    (:func:`rankslim.train.training_split`), so calibration and fine-tuning never see the images that judge them.
    """
    from .train.loop import training_split
    if isinstance(eval_data, str):
        raise DataError("eval_data must be a Dataset or DataLoader of held-out TRAINING samples (x, y); a dataset "
                        "name would mean its test split, which must not choose the model — pass data=NAME instead "
                        "and a part of its training split is held out")
    if eval_data is not None:
        ev = eval_data.dataset if isinstance(eval_data, DataLoader) else eval_data
        if not isinstance(ev, Dataset):
            raise DataError(f"eval_data must be a Dataset or DataLoader of (x, y), got {type(eval_data).__name__}")
        _labelled(ev, "eval_data")
        return data, ev
    if data is None:
        raise DataError("max_drop needs labelled training data to hold a part out: pass data=... (a dataset name, "
                        "Dataset or DataLoader of (x, y)) or eval_data=...")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    train, val, _ = training_split(data, val_fraction, seed)
    assert val is not None  # val_fraction > 0 and the split checked the size
    _labelled(val, "the training data")
    return train, val


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on labelled ``data`` (eval mode, mode restored)."""
    from .train.loop import evaluate
    return evaluate(model, data)[1]


def finetune_compressed(result: CompressionResult, original: nn.Module, data: Any, epochs: int,
                        options: Mapping[str, Any] | None = None, seed: int = 0, progress: bool = False
                        ) -> dict[str, Any]:
    """Fine-tune ``result.model`` in place for ``epochs`` epochs on ``data`` (training data), distilling from
    ``original`` unless ``options["distill"]`` is False; other ``options`` go to :func:`rankslim.finetune`
    (``lr``, ``temperature``, ``alpha``, ``train_samples``, ``val_fraction`` (default 0: the caller holds out
    its own data), ...).  With a held-out split (``val_fraction > 0``) a fine-tune that ends below the accuracy
    it started from is undone (``kept: "compressed"``, and a report note).  Returns what it did (settings,
    seconds, held-out accuracies) for the report; the plan stays attached."""
    from .train import finetune
    opts = dict(options or {})
    distill = bool(opts.pop("distill", True))
    opts.setdefault("val_fraction", 0.0)
    opts.setdefault("seed", seed)
    t0 = time.perf_counter()
    start = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    res = finetune(result.model, data, teacher=original if distill else None, epochs=int(epochs), inplace=True,
                   progress=progress, **opts)
    info = {"epochs": int(epochs), "distill": distill, **{k: v for k, v in opts.items() if k != "seed"},
            "seconds": round(time.perf_counter() - t0, 2), "epochs_run": len(res.history),
            "held_out_before": res.val_acc_before, "held_out_after": res.val_acc_after}
    if res.val_acc_after is not None and res.val_acc_before is not None and res.val_acc_after < res.val_acc_before:
        # a diverged or harmful fine-tune (too large a learning rate) must not replace a better model
        result.model.load_state_dict(start)
        info["kept"] = "compressed"
        result.report.notes.append(
            f"fine-tuning lowered held-out accuracy ({100 * res.val_acc_before:.2f}% -> {100 * res.val_acc_after:.2f}%): "
            "the compressed model was kept; try a smaller learning rate")
    else:
        info["kept"] = "finetuned"
    result.report.metrics["finetune"] = info
    return info


def compress_within_drop(
    model: nn.Module,
    input_shape: Iterable[int],
    *,
    max_drop: Any,
    method: str = "svd",
    params: float | None = None,
    macs: float | None = None,
    allocator: str | None = None,
    allocator_options: Mapping[str, Any] | None = None,
    methods: Mapping[str, str] | None = None,
    method_options: Mapping[str, Any] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_params: int = 0,
    keep_stem: bool = False,
    keep_head: bool = True,
    round_to: int = 1,
    data: Any = None,
    eval_data: Dataset | DataLoader | None = None,
    val_fraction: float = 0.1,
    calib_samples: int = 256,
    calib_batch_size: int = 64,
    calib_cache_bytes: int | None = None,
    sequential: bool = True,
    solver: str = "auto",
    seed: int = 0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    bn_recalibrate: bool = False,
    finetune_epochs: int = 0,
    finetune_options: Mapping[str, Any] | None = None,
    tol: float = DEFAULT_TOL,
    max_evals: int = DEFAULT_MAX_EVALS,
    progress: bool = False,
    spec: str | None = None,
    dataset: str | None = None,
) -> CompressionResult:
    """The compressed model at the smallest budget fraction whose held-out accuracy drop is at most ``max_drop``.

    ``max_drop``: fraction (``0.01`` = one accuracy point) or ``"1%"``.  The searched quantity is ``params``
    unless ``macs=`` is given; a given ``params=F`` / ``macs=F`` is the largest budget allowed (default 1.0).
    The upper end is evaluated first (if it already loses more than ``max_drop``, :class:`BudgetError` says
    what was tried); then bisection between the cheapest feasible budget (every layer at its minimum rank)
    and the smallest passing budget, until the bracket is narrower than ``tol`` or ``max_evals`` candidates
    were evaluated.  Drops are measured against the ORIGINAL model on the same held-out samples.
    With ``finetune_epochs > 0`` every candidate is fine-tuned (distillation from the original by default,
    ``finetune_options`` as in :func:`finetune_compressed`) on the non-held-out training data before it is
    measured.  Returns the chosen :class:`CompressionResult`; ``report.metrics["max_drop_search"]`` lists every
    candidate ``{budget, quantity, accuracy, drop, within, seconds}`` in the order tried.
    """
    drop_limit = parse_drop(max_drop)
    if params is not None and macs is not None:
        raise BudgetError("max_drop searches ONE budget quantity: give params=F or macs=F (the largest budget "
                          "allowed), not both")
    quantity = "macs" if macs is not None else "params"
    upper = float(macs if macs is not None else (params if params is not None else 1.0))
    Budget(**{quantity: upper})  # validates the fraction
    if not (tol > 0 and math.isfinite(tol)):
        raise OptionError(f"tol must be a positive budget fraction, got {tol}")
    if int(max_evals) < 1:
        raise OptionError(f"max_evals must be >= 1, got {max_evals}")
    if finetune_epochs < 0:
        raise OptionError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    alloc = choose_allocator(Budget(**{quantity: upper}), None, None, None, allocator, allocator_options)
    assert alloc is not None
    t_start = time.perf_counter()
    was_training = model.training
    if data is None and dataset is not None:
        data = dataset
    train_data, val = held_out(data, eval_data, val_fraction, seed)

    sel = select(model, input_shape, method, methods=methods, method_options=method_options, include=include,
                 exclude=exclude, min_params=min_params, keep_stem=keep_stem, keep_head=keep_head, inplace=False,
                 spec=spec, dataset=dataset)
    cal = calibrate(sel, train_data, calib_samples=calib_samples, sequential=sequential, seed=seed,
                    want_batches=bn_recalibrate or alloc.needs_context, batch_size=calib_batch_size,
                    cache_limit_bytes=calib_cache_bytes)
    table = cost_table(sel, cal, quantities=(quantity,), round_to=round_to, keep_head=keep_head)
    lowest = table.total(table.cheapest()).get(quantity) / max(sel.original_cost.get(quantity), 1)
    if upper < lowest:
        raise BudgetError(f"the {quantity} budget {upper:g} is below the smallest model possible ({lowest:.4f}: every "
                          "layer at its lowest rank); raise it or leave it out (max_drop then searches up to 1.0)")
    setup_s = time.perf_counter() - t_start
    base_acc = accuracy(sel.original, val)

    log: list[dict[str, Any]] = []
    results: dict[float, CompressionResult] = {}

    def evaluate_budget(frac: float) -> bool:
        t0 = time.perf_counter()
        budget = Budget(**{quantity: frac})
        allocation = allocate(sel, table, alloc, budget, calibration=cal, seed=seed, solver=solver, eval_fn=eval_fn)
        built = build(sel, allocation, cal, seed=seed, solver=solver, inplace=False)
        res = finalize(sel, built, allocation, cal, budget=budget, method=method,
                       budget_request={quantity: frac, "max_drop": drop_limit}, bn_recalibrate=bn_recalibrate,
                       timings={"select+calibrate+cost_table (shared)": setup_s}, was_training=was_training)
        entry: dict[str, Any] = {"budget": frac, "quantity": quantity,
                                 "measured": res.report.compressed.get(quantity) / sel.original_cost.get(quantity)}
        if finetune_epochs:
            entry["accuracy_compressed"] = accuracy(res.model, val)
            finetune_compressed(res, sel.original, train_data, finetune_epochs, finetune_options, seed=seed,
                                progress=progress)
        acc = accuracy(res.model, val)
        ok = base_acc - acc <= drop_limit + 1e-12
        entry.update(accuracy=acc, drop=base_acc - acc, within=ok, seconds=round(time.perf_counter() - t0, 3))
        log.append(entry)
        if progress:
            print(f"max_drop search: {quantity} {frac:.4f} -> held-out accuracy {acc:.4f} "
                  f"(drop {100 * (base_acc - acc):.2f} points) {'ok' if ok else 'too much'}", flush=True)
        if ok:
            results[frac] = res
        return ok

    if not evaluate_budget(upper):
        raise BudgetError(f"even a {quantity} budget of {upper:g} loses {100 * log[0]['drop']:.2f} accuracy points "
                          f"on held-out training data ({100 * log[0]['accuracy']:.2f}% vs the original's "
                          f"{100 * base_acc:.2f}%), more than max_drop={drop_limit:g}; allow a larger drop"
                          + ("" if finetune_epochs else ", fine-tune (finetune_epochs=N)")
                          + " or raise the budget")
    lo, hi = min(lowest, upper), upper
    # lo: the cheapest possible model is judged like any candidate; below it no allocation exists
    if lo < hi and len(log) < max_evals and evaluate_budget(lo):
        hi = lo
    while hi - lo > tol and len(log) < max_evals:
        mid = 0.5 * (lo + hi)
        if evaluate_budget(mid):
            hi = mid
        else:
            lo = mid
    chosen = results[hi]
    for k in list(results):
        if k != hi:
            del results[k]  # release the other candidates' models
    m = chosen.report.metrics
    m["max_drop_search"] = log
    m["max_drop"] = {"max_drop": drop_limit, "quantity": quantity, "chosen_budget": hi, "upper": upper,
                     "lowest_feasible": lowest, "original_accuracy": base_acc, "held_out_samples": len(val),
                     "held_out": "eval_data" if eval_data is not None else f"{val_fraction:g} of the training data",
                     "evaluations": len(log), "tol": tol, "finetune_epochs": finetune_epochs,
                     "seconds": round(time.perf_counter() - t_start, 2)}
    chosen.report.budget = {quantity: hi, "max_drop": drop_limit}
    return chosen


__all__ = ["DEFAULT_MAX_EVALS", "DEFAULT_TOL", "accuracy", "compress_within_drop", "finetune_compressed",
           "held_out", "parse_drop"]
