"""The whole-model check of speed-aware allocation: is the built model measurably faster than the original?

Speed-aware mode times every target layer ALONE (:mod:`rankslim.latency_cache`) and factorizes a layer only at
ranks measured at least ``margin`` faster than dense.  Layers timed alone are not the model: inside it a
factorized layer writes an extra intermediate tensor, the neighbours' data is no longer in cache, and many
small per-layer gains can add up to a whole model that is slower (seen on the zoo ViT at 0.7 of its Linear
parameters: every factorized layer 5% faster alone, the encoder 2-5% slower).  So after building,
:func:`rankslim.compress` times the built model against the original on the same runtime, batch and threads;
when it is not faster it raises the margin (:data:`ESCALATION`), which keeps the layers with the smallest
measured gains dense, allocates and builds again, and keeps the fastest model that meets the budget.  If none is
faster, an explicit ``speed_aware=True`` refuses (:class:`~rankslim.errors.BudgetError`); the default "auto"
keeps the budget-meeting model and says in a warning note how much slower it measured.

Timing: the two models alternate (original, compressed, original, ...) in :data:`ROUNDS` rounds so that a
change of machine load affects both alike; each model's time is the median over its rounds' calls.  The number
of calls adapts to the model so that one check takes about :data:`CHECK_SECONDS` (at least
:data:`MIN_REPEATS` calls per round).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .inputs import Inputs, call_model, concat_batches, is_inputs

#: margins tried, in order, after the requested one when the built model is not faster
ESCALATION = (0.15, 0.3, 0.5)
#: a built model counts as faster when original_ms / compressed_ms is at least this: 2% beyond the noise of
#: interleaved medians on a quiet machine, so that "faster" survives being timed again
MIN_SPEEDUP = 1.02
#: target wall time of one check (both models, all rounds), seconds; the repeats adapt to it
CHECK_SECONDS = 6.0
ROUNDS = 3
MIN_REPEATS = 3
MAX_REPEATS = 15


@dataclass
class WholeModelTiming:
    """One whole-model comparison: medians (ms per batch) of the original and the compressed model, their ratio
    ``speedup = original_ms / compressed_ms``, the margin whose allocation was built (``None``: a MAC-only
    allocation, no margin), and how it was timed."""

    original_ms: float
    compressed_ms: float
    speedup: float
    margin: float | None
    runtime: str
    batch: int
    threads: int
    calls: int

    @property
    def faster(self) -> bool:
        """At least :data:`MIN_SPEEDUP` times as fast as the original."""
        return self.speedup >= MIN_SPEEDUP

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``faster``."""
        return {**asdict(self), "faster": self.faster}


def batched(example: Inputs, batch: int) -> Inputs:
    """``example`` (one sample: a tensor, tuple or dict of tensors) repeated to ``batch`` samples."""
    return concat_batches([example] * int(batch))


def _runner(model: nn.Module, x: Inputs, runtime: str, threads: int, workdir: Path, tag: str) -> Callable[[], Any]:
    """A no-argument call of ``model`` on ``x`` in ``runtime`` (ONNX: exported once into ``workdir``)."""
    if runtime == "onnxruntime":
        from .bench import onnx_call
        if not isinstance(x, torch.Tensor):
            raise TypeError("the onnxruntime check takes models with one tensor input")
        return onnx_call(model, x, workdir / f"{tag}.onnx", threads)
    if runtime == "eager-cl":
        from .bench import channels_last
        model, x = channels_last(model, x)

    def call() -> Any:
        with torch.no_grad():
            return call_model(model, x)
    return call


def _time(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def time_models(models: list[nn.Module], example: Inputs, *, runtime: str = "eager", batch: int = 1,
                threads: int = 1, check_seconds: float = CHECK_SECONDS) -> tuple[list[float], int]:
    """Median ms per batch of each of ``models`` on ``example`` repeated to ``batch`` samples, the models
    alternating in :data:`ROUNDS` rounds; also the number of timed calls per model.

    ``runtime``: ``"eager"`` (any inputs) or ``"onnxruntime"`` (one tensor input; each model is exported).
    The models run in eval mode and are left in their training modes.
    """
    from .bench import torch_threads
    if not is_inputs(example):
        raise TypeError(f"example must be a tensor, tuple or dict of tensors, got {type(example).__name__}")
    x = batched(example, batch)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="rankslim-check-") as d, torch_threads(threads):
            runs = [_runner(m, x, runtime, threads, Path(d), f"model{i}") for i, m in enumerate(models)]
            for run in runs:  # warm-up: one-time initialisation, and a first guess of the time per call
                run()
            t_one = max(min(_time(run, 1)[0] for run in runs), 1e-3)
            repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, check_seconds * 1e3 / (len(runs) * ROUNDS * t_one))))
            samples: list[list[float]] = [[] for _ in runs]
            for _ in range(ROUNDS):
                for i, run in enumerate(runs):
                    samples[i] += _time(run, repeats)
    finally:
        for m, was in zip(models, modes):
            m.train(was)
    return [float(statistics.median(s)) for s in samples], ROUNDS * repeats


def compare_models(original: nn.Module, compressed: nn.Module, example: Inputs, *, runtime: str = "eager",
                   batch: int = 1, threads: int = 1, margin: float | None = 0.0,
                   check_seconds: float = CHECK_SECONDS) -> WholeModelTiming:
    """:func:`time_models` of ``original`` and ``compressed`` as a :class:`WholeModelTiming` (``margin`` is only
    recorded)."""
    (o, c), calls = time_models([original, compressed], example, runtime=runtime, batch=batch, threads=threads,
                                check_seconds=check_seconds)
    return timing(o, c, margin=margin, runtime=runtime, batch=batch, threads=threads, calls=calls)


def timing(original_ms: float, compressed_ms: float, *, margin: float | None, runtime: str, batch: int, threads: int,
           calls: int) -> WholeModelTiming:
    """A :class:`WholeModelTiming` from two medians (ms per batch)."""
    return WholeModelTiming(float(original_ms), float(compressed_ms),
                            float(original_ms / compressed_ms) if compressed_ms > 0 else float("inf"),
                            None if margin is None else float(margin),
                            runtime, int(batch), int(threads), int(calls))


def describe(t: WholeModelTiming) -> str:
    """``whole model measured 1.23x (12.1 -> 9.8 ms per batch of 32, eager, 1 thread(s), margin 15%)``."""
    return (f"whole model measured {t.speedup:.2f}x ({t.original_ms:.3g} -> {t.compressed_ms:.3g} ms per batch of "
            f"{t.batch}, {t.runtime}, {t.threads} thread(s)"
            + (")" if t.margin is None else f", layer margin {t.margin:.0%})"))


def margins_after(margin: float) -> list[float]:
    """The margins to try when the allocation at ``margin`` built a model that is not faster."""
    return [m for m in ESCALATION if m > margin]


__all__ = ["CHECK_SECONDS", "ESCALATION", "MIN_SPEEDUP", "WholeModelTiming", "batched", "compare_models",
           "describe", "margins_after", "time_models", "timing"]
