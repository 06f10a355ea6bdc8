"""Which allocation a :func:`rankslim.compress` call uses — speed-aware (measured) or MAC-only — and why.

``compress(speed_aware="auto")`` (the default) turns speed-aware allocation on only where it is both meaningful
and cheap:

* meaningful: the call has a ``macs`` budget (speed-aware mode keeps layers that are not measurably faster
  dense, which only serves a budget about compute; ``params``-only budgets, ``ratio``, ``energy``, explicit
  ``ranks`` and the ``max_drop`` accuracy search stay MAC-only), and the targets are float32 on the CPU (the
  latency cache times float32 layers on the CPU);
* cheap: every timing it needs is already in the latency cache, or :func:`estimate_measuring` puts the
  measuring below ``max_seconds`` (default :data:`DEFAULT_MAX_SECONDS`).

When the speed-aware allocation then cannot meet the budget (too few layers measured faster), "auto" falls back
to the plain MAC-only allocation and says why; ``speed_aware=True`` raises :class:`~rankslim.errors.BudgetError`.

``$RANKSLIM_SPEED_AWARE`` (``auto`` | ``on`` | ``off``) overrides "auto" only: explicit ``True`` / ``False``
are never overridden.  The test suite sets it to ``off`` so that no test depends on this machine's timings.

Every report records the outcome in ``report.metrics["allocation_mode"]`` (see :func:`describe`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .bench import RUNTIMES
from .errors import OptionError

#: environment variable read when ``speed_aware`` is "auto": ``auto`` (or empty), ``on`` or ``off``
SPEED_ENV = "RANKSLIM_SPEED_AWARE"
#: "auto" measures only when the estimated measuring time is at most this (seconds): "seconds, not minutes"
DEFAULT_MAX_SECONDS = 20.0
#: Throughput (MACs per second) the estimate assumes for timing the layers: about a tenth of what one fp32 CPU
#: core with AVX2 FMA can reach (2 × 8 MACs per cycle at ~3 GHz ≈ 48 GMAC/s peak).  Deliberately low: the timed
#: forms are single small layers (batch 1 by default, thin factorized convolutions) run in eager mode, where
#: per-op overhead and poor cache use take much of the peak, and the machine may be shared or older.  Erring low
#: makes "auto" skip measuring it could have afforded rather than start minutes of measuring nobody asked for;
#: it is not scaled by ``threads`` for the same reason.  A guess on the safe side, not a benchmarked figure.
MEASURE_MACS_PER_SECOND = 4e9
#: Fixed seconds per timed layer form on top of its MACs: building and filling the layer, the timing loop's
#: peak-memory probe and Python call overhead (eager); exporting the layer to ONNX and opening a session
#: (onnxruntime, by far the larger).  Guesses on the safe side, like the throughput.
MODULE_OVERHEAD_SECONDS = {"eager": 0.005, "eager-cl": 0.005, "onnxruntime": 0.1}
#: Methods whose layers cannot be built from a rank alone (Tucker-2, TT, L + S) are decomposed for real at every
#: sampled rank before timing: about this many MACs per weight entry per smaller side (an SVD-like cost).
DECOMPOSE_MACS_PER_ENTRY_RANK = 4
#: measuring options ``pipeline.speed_aware`` takes
MEASURE_OPTIONS = ("runtime", "batch", "threads", "margin", "samples")


@dataclass(frozen=True)
class SpeedRequest:
    """What the caller asked for, after the environment variable.

    ``mode``: ``"auto"``, ``"on"`` or ``"off"``; ``explicit``: the ``speed_aware`` argument itself said on/off
    (not the default nor the environment); ``source``: words for the report; ``options``: measuring options for
    :func:`rankslim.pipeline.speed_aware`; ``max_seconds``: the "auto" threshold on the estimated measuring time.
    """

    mode: str
    explicit: bool
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    max_seconds: float = DEFAULT_MAX_SECONDS
    #: time the built model against the original (:mod:`rankslim.whole_model`) and tighten the margin when slower
    check: bool = True
    #: after the allocator, the time-aware step (:mod:`rankslim.allocate.timed`): the fastest allocation at the
    #: budget whose error proxy is at most ``1 + error_slack`` times the allocator's
    time_aware: bool = True
    error_slack: float = 0.0

    @property
    def measure_options(self) -> dict[str, Any]:
        """The measuring options the caller gave (:data:`MEASURE_OPTIONS`, margin included)."""
        return {k: v for k, v in self.options.items() if k in MEASURE_OPTIONS}

    @property
    def measuring(self) -> dict[str, Any]:
        """runtime / batch / threads / samples with their defaults filled in (what is timed)."""
        return {"runtime": "eager", "batch": 1, "threads": 1, "samples": 8,
                **{k: v for k, v in self.measure_options.items() if k != "margin"}}


#: what ``speed_aware={...}`` takes besides the measuring options
CONTROL_OPTIONS = ("mode", "max_seconds", "check", "time_aware", "error_slack")


def _check_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(MEASURE_OPTIONS) - set(CONTROL_OPTIONS))
    if unknown:
        raise OptionError(f"speed_aware takes {', '.join(MEASURE_OPTIONS + CONTROL_OPTIONS)}; not {unknown}")
    if "check" in opts and not isinstance(opts["check"], bool):
        raise OptionError(f"speed_aware check is True (time the built model against the original, the default) or "
                          f"False, got {opts['check']!r}")
    if "time_aware" in opts and not isinstance(opts["time_aware"], bool):
        raise OptionError(f"speed_aware time_aware is True (after the allocator, take the fastest allocation with no "
                          f"larger error proxy, the default) or False, got {opts['time_aware']!r}")
    slack = opts.get("error_slack")
    if slack is not None and (isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack <= 10):
        raise OptionError(f"speed_aware error_slack is how much larger (a fraction >= 0, at most 10; 0.1: 10%) the "
                          f"time-aware step may make the error proxy than the allocator's, got {slack!r}")
    out = dict(opts)
    if "runtime" in out and out["runtime"] not in RUNTIMES:
        raise OptionError(f"speed_aware runtime must be one of {', '.join(RUNTIMES)}, got {out['runtime']!r}")
    for name in ("batch", "threads", "samples"):
        v = out.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise OptionError(f"speed_aware {name} must be a positive integer, got {v!r}")
    margin = out.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not 0 <= margin < 1):
        raise OptionError(f"speed_aware margin is a fraction in [0, 1) (0.05: 5% faster than dense), got {margin!r}")
    limit = out.get("max_seconds")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0):
        raise OptionError(f"speed_aware max_seconds is the longest estimated measuring (seconds, >= 0) auto mode "
                          f"accepts, got {limit!r}")
    return out


def speed_request(value: bool | str | Mapping[str, Any] | None) -> SpeedRequest:
    """Parse ``compress(speed_aware=...)``: ``True`` / ``False`` / ``"auto"`` (also ``"on"`` / ``"off"``) or a
    dict of measuring options (``{"batch": 32}``; on unless it says ``"mode": "auto"``, which also takes
    ``"max_seconds"``; ``"check": False`` skips the whole-model check of :mod:`rankslim.whole_model`;
    ``"time_aware": False`` skips the time-aware step of :mod:`rankslim.allocate.timed` and ``"error_slack": s``
    lets that step raise the error proxy by the fraction ``s``).
    ``$RANKSLIM_SPEED_AWARE`` is read only in auto mode.  Bad values raise OptionError."""
    opts: dict[str, Any] = {}
    if isinstance(value, bool):
        mode = "on" if value else "off"
    elif value is None:
        mode = "auto"
    elif isinstance(value, str):
        mode = value.strip().lower()
    elif isinstance(value, Mapping):
        opts = _check_options(value)
        mode = str(opts.pop("mode", "on")).strip().lower()
    else:
        raise OptionError(f"speed_aware takes True, False, 'auto' or a dict of options, got {value!r}")
    if mode not in ("auto", "on", "off"):
        raise OptionError(f"speed_aware mode must be 'auto', 'on' or 'off', got {mode!r}")
    has_limit = "max_seconds" in opts
    max_seconds = float(opts.pop("max_seconds", DEFAULT_MAX_SECONDS))
    check = bool(opts.pop("check", True))
    timed = {"time_aware": bool(opts.pop("time_aware", True)), "error_slack": float(opts.pop("error_slack", 0.0))}
    if not timed["time_aware"] and timed["error_slack"]:
        raise OptionError("speed_aware error_slack belongs to the time-aware step, which time_aware=False turns off: "
                          "drop one of them")
    if mode != "auto" and has_limit:
        raise OptionError("speed_aware max_seconds is the threshold of auto mode: pass {'mode': 'auto', "
                          "'max_seconds': S} (with speed_aware on, everything is measured whatever it costs)")
    if mode != "auto":
        return SpeedRequest(mode, True, f"speed_aware={'True' if mode == 'on' else 'False'}", opts, max_seconds, check,
                            **timed)
    env = os.environ.get(SPEED_ENV, "").strip().lower()
    if env not in ("", "auto", "on", "off"):
        raise OptionError(f"${SPEED_ENV} must be auto, on or off, got {env!r}: fix or unset it (or pass "
                          "speed_aware=True / False, which it does not override)")
    if env in ("on", "off"):
        return SpeedRequest(env, False, f"{SPEED_ENV}={env}", opts, max_seconds, check, **timed)
    return SpeedRequest("auto", False, "auto", opts, max_seconds, check, **timed)


# ------------------------------------------------------------------------------------------ estimate


@dataclass
class MeasureEstimate:
    """Seconds the speed-aware timings of one call are estimated to take (0 when all are cached), and how many
    distinct layer forms (dense + one per sampled rank; layers of equal geometry share theirs) must be timed vs.
    are already in the latency cache."""

    seconds: float
    to_measure: int
    cached: int


def _decomposes_for_real(method, target) -> bool:
    """True when timing ``method`` on ``target`` decomposes the weight at every rank (no rank-only structure)."""
    try:
        method.structure(target.module, {"rank": 1})
        return False
    except Exception:  # same test as latency_cache.layer_at_rank, which falls back to decompose
        return True


def estimate_measuring(selection, table, *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                       samples: int = 8, cache=None) -> MeasureEstimate:
    """Estimated seconds to time, for every layer of ``table``, the forms the latency cache does not hold yet.

    Each form runs ``WARMUP + 1 + REPEATS`` times on a batch of ``batch``: its MACs (dense MACs for the dense
    form, the method's cost at each sampled rank otherwise) × batch × calls / :data:`MEASURE_MACS_PER_SECOND`,
    plus :data:`MODULE_OVERHEAD_SECONDS` per form, plus the decompositions of methods that cannot build a layer
    from a rank alone.  Reads the cache, measures nothing.
    """
    from .latency_cache import REPEATS, WARMUP, latency_key, missing_measurements, rank_grid
    calls = WARMUP + 1 + REPEATS
    overhead = MODULE_OVERHEAD_SECONDS.get(runtime, max(MODULE_OVERHEAD_SECONDS.values()))
    targets = {t.name: t for t in selection.targets}
    seconds, to_measure, cached = 0.0, 0, 0
    seen: set[str] = set()
    for lo in table.layers:
        t, m = targets[lo.name], selection.methods[lo.name]
        key = latency_key(m, t, runtime=runtime, batch=batch, threads=threads).digest()
        if key in seen:  # same geometry as an earlier layer (ResNet blocks): timed once, then read from the cache
            continue
        seen.add(key)
        grid = rank_grid(lo.max_rank, samples)
        dense_missing, ranks_missing = missing_measurements(m, t, grid, runtime=runtime, batch=batch,
                                                            threads=threads, cache=cache)
        n = int(dense_missing) + len(ranks_missing)
        to_measure += n
        cached += 1 + len(grid) - n
        if not n:
            continue
        macs = (lo.dense.macs if dense_missing else 0) + sum(lo.cost_fn(r).macs for r in ranks_missing)
        seconds += macs * batch * calls / MEASURE_MACS_PER_SECOND + n * overhead
        if ranks_missing and _decomposes_for_real(m, t):
            w = t.module.weight
            rows, cols = int(w.shape[0]), int(w.numel() // max(int(w.shape[0]), 1))
            seconds += (len(ranks_missing) * DECOMPOSE_MACS_PER_ENTRY_RANK * rows * cols * min(rows, cols)
                        / MEASURE_MACS_PER_SECOND)
    return MeasureEstimate(seconds, to_measure, cached)


# ------------------------------------------------------------------------------------------ decision


def seconds_text(s: float) -> str:
    """``140 s``, ``3.1 s``, ``0.004 s``: seconds with as many digits as they need."""
    return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"


def mac_only(reason: str, request: SpeedRequest) -> dict[str, Any]:
    """The ``allocation_mode`` record of a MAC-only allocation."""
    return {"mode": "mac-only", "reason": reason, "requested": request.mode, "source": request.source}


def target_dtype_device(selection) -> tuple[set[torch.dtype], set[str]]:
    """Dtypes and device types of the targets' weights."""
    ws = [t.module.weight for t in selection.targets if isinstance(getattr(t.module, "weight", None), torch.Tensor)]
    return {w.dtype for w in ws}, {w.device.type for w in ws}


def auto_decision(request: SpeedRequest, selection, table, *, macs_budget: bool, fixed_by: str | None = None,
                  params_budget: bool = False, cache=None) -> tuple[str | None, MeasureEstimate | None]:
    """Whether an "auto" request measures: ``(None, estimate)`` to measure, else ``(reason, estimate or None)``.

    ``macs_budget``: the call has a ``macs`` budget; ``fixed_by``: ``"ratio"``, ``"energy"`` or ``"ranks"`` when
    those fix the ranks, or a budget-free allocator's name; ``params_budget``: a params budget was given.
    """
    if not macs_budget:
        why = (f"{fixed_by} fixes the ranks" if fixed_by in ("ratio", "energy", "ranks")
               else f"budget-free allocator {fixed_by}" if fixed_by else "params-only budget" if params_budget
               else "no budget")
        return f"no MAC budget ({why})", None
    dtypes, devices = target_dtype_device(selection)
    if devices - {"cpu"} or dtypes - {torch.float32}:
        got = ", ".join(sorted({str(d).replace("torch.", "") for d in dtypes} | devices))
        return (f"the layers are {got}: speed-aware timings are float32 on the CPU (pass speed_aware=True on a "
                "float32 CPU copy to measure)"), None
    m = request.measuring
    est = estimate_measuring(selection, table, runtime=m["runtime"], batch=m["batch"], threads=m["threads"],
                             samples=m["samples"], cache=cache)
    if est.to_measure and est.seconds > request.max_seconds:
        return (f"measuring estimated at {seconds_text(est.seconds)} > {seconds_text(request.max_seconds)} "
                f"({est.to_measure} layer forms to time, {est.cached} cached)"), est
    return None, est


def describe(mode: Mapping[str, Any]) -> str:
    """One line for the report / CLI: which allocation was used and why."""
    if mode.get("mode") == "latency budget":
        return (f"latency budget ({mode.get('runtime')}, batch {mode.get('batch')}, {mode.get('threads')} thread(s): "
                f"measured time <= {float(mode['latency']):g} of the original's; predicted "
                f"{float(mode['predicted']):.3f} from the layers timed alone, smallest reachable "
                f"{float(mode['smallest']):.3f})")
    if mode.get("mode") == "speed-aware":
        margin = 100 * float(mode.get("margin", 0))
        how = (f"{mode.get('runtime')}, batch {mode.get('batch')}, {mode.get('threads')} thread(s): a layer is "
               f"factorized only at ranks measured at least {margin:.0f}% faster than dense")
        why = mode.get("source", "")
        if mode.get("estimated_s") is not None:
            why += ("; all timings cached" if not mode.get("to_measure")
                    else f"; measuring estimated at {seconds_text(float(mode['estimated_s']))}")
        ta = mode.get("time_aware") or {}
        if ta.get("time_aware") == "fastest within error":
            why += (f"; time-aware: {ta.get('changed_layers')} layer rank(s) moved, predicted "
                    f"{float(ta['predicted_ms']):.3g} ms vs the allocator's {float(ta['reference_ms']):.3g} ms at no "
                    f"more than {1 + float(ta.get('slack', 0)):g}x its error proxy")
        elif ta.get("time_aware") == "kept" and ta.get("solution_ms") is not None:
            gain = 1 - float(ta["solution_ms"]) / max(float(ta["reference_ms"]), 1e-12)
            why += (f"; time-aware: the allocator's ranks kept (the fastest allocation at no larger error proxy was "
                    f"predicted {100 * gain:.1f}% faster, below the {100 * float(ta.get('min_gain', 0)):.0f}% margin)")
        elif ta.get("time_aware") == "off":
            why += "; time-aware step off"
        if mode.get("whole_model_speedup") is not None:
            why += f"; whole model measured {float(mode['whole_model_speedup']):.2f}x the original's speed"
        return f"speed-aware ({how}; {why})"
    return f"mac-only ({mode.get('reason', '')})"


__all__ = ["DEFAULT_MAX_SECONDS", "MEASURE_MACS_PER_SECOND", "MODULE_OVERHEAD_SECONDS", "MeasureEstimate",
           "SPEED_ENV", "SpeedRequest", "auto_decision", "describe", "estimate_measuring", "mac_only",
           "seconds_text", "speed_request"]
