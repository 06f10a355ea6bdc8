"""Measured speed: latency and peak memory of a model in PyTorch eager or ONNX Runtime, per layer and in total,
and the comparison of an original model with its compressed version (speedup, efficiency).

What is measured (all on CPU):

* **latency**: wall-clock milliseconds of one forward pass on a batch of ``batch`` inputs, after ``warmup``
  untimed passes; ``repeats`` timed passes give the median and the inter-quartile range (IQR, p75 - p25).
  ``threads`` is the intra-op thread count (``torch.set_num_threads`` / ONNX Runtime ``intra_op_num_threads``),
  restored afterwards.
* **peak memory** (``peak_mem_bytes``): growth of the process's resident set during one forward pass after
  the warm-up — freed heap handed back to the OS first (glibc ``malloc_trim``), then Linux ``VmHWM`` reset
  through ``/proc/self/clear_refs``, minus ``VmRSS`` before the call.  It counts the activations and workspace
  the pass takes from the operating system (not the weights, already resident); memory an allocator keeps
  cached between passes is not counted; ``None`` where ``/proc`` does not allow it.  ``model_bytes`` is the weights' and buffers' size.
* **per layer** (eager only): forward pre/post hooks time each named layer inside the whole forward pass
  (median over the repeats, milliseconds per batch); MACs of each layer counted by ``FlopCounterMode``.
* **efficiency** = measured speedup ÷ MAC reduction, where speedup = original median / compressed median and
  MAC reduction = original MACs / compressed MACs (both counted by ``FlopCounterMode``).  1.0 means the
  compressed model is exactly as much faster as its MAC count promises.

Timings on a loaded machine are noisy: compare numbers measured in one run, on an otherwise idle machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import RankslimError
from .inputs import map_tensors

#: ``eager``: PyTorch as the model is; ``eager-cl``: PyTorch with 4-D weights and inputs in channels-last memory
#: format (a copy of the model: the deployment layout oneDNN convolutions run without reorders);
#: ``onnxruntime``: exported to ONNX, CPU provider, all graph optimizations
RUNTIMES = ("eager", "eager-cl", "onnxruntime")


def channels_last(model: nn.Module, x: Any) -> tuple[nn.Module, Any]:
    """A copy of ``model`` with its 4-D parameters and buffers in channels-last memory format, and ``x`` with its
    4-D tensors converted (other tensors, and models without convolutions, are unchanged).  The ``eager-cl``
    runtime times these; the user's model is never converted."""
    import copy
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return cl, map_tensors(x, lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


@dataclass
class Latency:
    """One latency measurement: ``median_ms`` and ``iqr_ms`` of ``repeats`` timed passes (ms per batch of
    ``batch`` inputs) on ``runtime`` with ``threads`` intra-op threads; ``samples_ms`` every timed pass;
    ``peak_mem_bytes`` see the module docstring; ``per_layer``: ``{layer: median ms}`` (eager, when asked)."""

    runtime: str
    batch: int
    threads: int
    median_ms: float
    iqr_ms: float
    repeats: int
    warmup: int
    samples_ms: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    model_bytes: int | None = None
    per_layer: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``samples_ms`` included)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ helpers


def _proc_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> tuple[int, int]:
    """``(current, peak)`` resident set size of this process in bytes (``/proc/self/status``: VmRSS, VmHWM;
    elsewhere the peak from ``getrusage`` for both)."""
    cur, peak = _proc_kb("VmRSS"), _proc_kb("VmHWM")
    if cur is not None and peak is not None:
        return cur * 1024, peak * 1024
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak, peak


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux: write 5 to ``/proc/self/clear_refs``, VmHWM becomes the
    current RSS, Linux >= 4.0); True when it worked, so a reported peak belongs to what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_MALLOC_TRIM: Any = None


def give_back_memory() -> None:
    """Free cyclic garbage and return freed heap pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere),
    so the memory a pass needs shows in its RSS.

    Without it glibc's heap fragments and the resident memory creeps up block after block in streamed
    compression (measured on a 1B Llama: +20 MB per block, and a higher peak); with it it stays flat."""
    import gc
    gc.collect()
    trim_heap()


def fix_heap_thresholds(mmap_bytes: int = 64 * 2**20, trim_bytes: int = 256 * 2**20) -> bool:
    """Fix glibc's malloc thresholds for this whole process (``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD);
    True when it worked (glibc only).  For benchmark processes, not for a library call: it changes the process.

    glibc adjusts both thresholds as the process allocates and frees, so the same model's latency depends on what
    the process ran before: measured here, ResNet-20 at batch 1 took 2.0 ms, then 4.8 ms (original and compressed
    alike) after a compressed model was evaluated at batch 256, because each call's activations were then mapped
    and unmapped (page faults) instead of reused from the heap.  Fixed thresholds keep allocations below
    ``mmap_bytes`` on the heap and the heap untrimmed below ``trim_bytes``, whatever ran before."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(mmap_bytes))) and bool(mallopt(m_trim_threshold, int(trim_bytes)))


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere), without a garbage
    collection.  It costs tens of ms on a large heap (about 50 ms measured in calibration), so the calibrator
    calls it once per target, not once per batch."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def peak_rss_growth(fn) -> tuple[Any, int | None]:
    """Run ``fn()`` and return ``(its result, peak resident-set growth in bytes during the call)`` (``None``
    when the platform cannot reset the peak).  Freed heap memory is returned to the OS first (glibc)."""
    give_back_memory()
    ok = reset_peak_rss()
    before = _proc_kb("VmRSS")
    out = fn()
    peak = _proc_kb("VmHWM")
    if not ok or before is None or peak is None:
        return out, None
    return out, max(0, peak - before) * 1024


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set ``torch.set_num_threads(n)`` for the block and restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _summary(samples: Sequence[float]) -> tuple[float, float]:
    s = sorted(samples)
    if len(s) < 2:
        return float(s[0]), 0.0
    q = statistics.quantiles(s, n=4, method="inclusive")
    return float(statistics.median(s)), float(q[2] - q[0])


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def make_example(input_shape: Sequence[int], batch: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random ``(batch, *input_shape)`` input (seeded)."""
    return torch.randn(int(batch), *[int(s) for s in input_shape], generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


def _check_args(runtime: str, threads: int, warmup: int, repeats: int) -> None:
    if runtime not in RUNTIMES:
        raise RankslimError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if threads < 1 or warmup < 0 or repeats < 1:
        raise RankslimError(f"threads and repeats must be >= 1 and warmup >= 0 (got threads={threads}, "
                            f"warmup={warmup}, repeats={repeats})")


# ------------------------------------------------------------------------------------------- eager


class _LayerTimer:
    """Forward pre/post hooks that time each named module (ms per call, summed over calls in one pass)."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = list(names)
        self.current: dict[str, float] = {}
        self.passes: dict[str, list[float]] = {n: [] for n in self.names}
        self.handles = []
        self._start: dict[str, float] = {}
        mods = dict(model.named_modules())
        for n in self.names:
            if n not in mods:
                raise RankslimError(f"no layer named {n!r} to time")
            m = mods[n]
            self.handles.append(m.register_forward_pre_hook(lambda _m, _a, n=n: self._pre(n)))
            self.handles.append(m.register_forward_hook(lambda _m, _a, _o, n=n: self._post(n)))

    def _pre(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def _post(self, name: str) -> None:
        self.current[name] = self.current.get(name, 0.0) + 1e3 * (time.perf_counter() - self._start.pop(name))

    def end_pass(self) -> None:
        for n in self.names:
            self.passes[n].append(self.current.get(n, 0.0))
        self.current = {}

    def medians(self) -> dict[str, float]:
        return {n: float(statistics.median(v)) for n, v in self.passes.items() if v}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _time_calls(call, warmup: int, repeats: int, after_each=None) -> tuple[list[float], int | None]:
    for _ in range(warmup):
        call()
    _, peak = peak_rss_growth(call)  # after warm-up (one-time initialisation excluded), heap trimmed first
    if after_each is not None:
        after_each(reset=True)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append(1e3 * (time.perf_counter() - t0))
        if after_each is not None:
            after_each(reset=False)
    return samples, peak


def measure_latency(model: nn.Module, example_input: torch.Tensor | Sequence[int], *, runtime: str = "eager",
                    threads: int = 1, batch: int | None = None, warmup: int = 3, repeats: int = 10,
                    layers: Iterable[str] | None = None) -> Latency:
    """Latency (ms per batch) and peak memory of ``model`` on ``runtime`` (``"eager"`` or ``"onnxruntime"``).

    ``example_input``: a tensor ``(batch, ...)`` used as is, or a per-sample shape (a random input of
    ``batch`` samples, default 1, is made).  ``layers``: names whose time inside the pass is also reported
    (eager only).  The model runs in eval mode under ``torch.no_grad`` and is left in its training mode.
    """
    _check_args(runtime, threads, warmup, repeats)
    if isinstance(example_input, torch.Tensor):
        x = example_input if batch is None or batch == example_input.shape[0] else \
            example_input[:1].expand(batch, *example_input.shape[1:]).contiguous()
    else:
        x = make_example(example_input, batch or 1)
    b = int(x.shape[0])
    if runtime == "onnxruntime":
        if layers:
            raise RankslimError("per-layer times are measured in eager mode only")
        with tempfile.TemporaryDirectory(prefix="rankslim-bench-") as d:
            path = Path(d) / "model.onnx"
            samples, peak = _time_calls(onnx_call(model, x, path, threads), warmup, repeats)
        med, iqr = _summary(samples)
        return Latency("onnxruntime", b, threads, med, iqr, repeats, warmup, samples, peak, model_bytes(model))
    if runtime == "eager-cl":
        model, x = channels_last(model, x)
    was = model.training
    model.eval()
    timer = _LayerTimer(model, layers) if layers else None

    def after_each(reset: bool) -> None:
        if reset:
            timer.passes = {n: [] for n in timer.names}
            timer.current = {}
        else:
            timer.end_pass()
    try:
        with torch.no_grad(), torch_threads(threads):
            samples, peak = _time_calls(lambda: model(x), warmup, repeats, after_each if timer else None)
    finally:
        if timer is not None:
            timer.remove()
        model.train(was)
    med, iqr = _summary(samples)
    return Latency(runtime, b, threads, med, iqr, repeats, warmup, samples, peak, model_bytes(model),
                   timer.medians() if timer else {})


def ort_call(path: str | os.PathLike, example_input: torch.Tensor, threads: int = 1) -> Callable[[], Any]:
    """A no-argument call that runs the ONNX file ``path`` on ``example_input`` ``(batch, ...)`` in ONNX Runtime
    (CPU provider, ``threads`` intra-op threads, all graph optimizations): the session and feed are made once."""
    from .export import _ort_session
    sess = _ort_session(path, threads)
    feed = {sess.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


def onnx_call(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
              threads: int = 1) -> Callable[[], Any]:
    """:func:`ort_call` of ``model`` exported to ``path`` for inputs shaped like ``example_input``."""
    from .export import export_onnx
    export_onnx(model, tuple(example_input.shape[1:]), path, check=False)
    return ort_call(path, example_input, threads)


def measure_onnx(path: str | os.PathLike, example_input: torch.Tensor, *, threads: int = 1, warmup: int = 3,
                 repeats: int = 10) -> Latency:
    """Latency (ms per batch) and peak memory of the ONNX file ``path`` in ONNX Runtime (CPU provider,
    ``threads`` intra-op threads, all graph optimizations) on ``example_input`` ``(batch, ...)``."""
    _check_args("onnxruntime", threads, warmup, repeats)
    samples, peak = _time_calls(ort_call(path, example_input, threads), warmup, repeats)
    med, iqr = _summary(samples)
    return Latency("onnxruntime", int(example_input.shape[0]), threads, med, iqr, repeats, warmup, samples, peak,
                   Path(path).stat().st_size)


# --------------------------------------------------------------------------------------- comparison


def layer_macs(model: nn.Module, example_input: torch.Tensor, names: Iterable[str]) -> dict[str, int]:
    """MACs per sample of each named layer, counted by ``FlopCounterMode`` on the layer alone at the input it
    receives inside ``model(example_input)`` (FLOPs / 2, divided by the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = list(names)
    mods = dict(model.named_modules())
    seen: dict[str, list[tuple]] = {n: [] for n in names}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a)) for n in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out: dict[str, int] = {}
    b = int(example_input.shape[0])
    for n in names:
        total = 0
        for args in seen[n]:
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                mods[n](*args)
            total += fc.get_total_flops() // 2
        out[n] = int(total // b)
    return out


def total_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Whole-model MACs per sample by ``FlopCounterMode`` (FLOPs / 2 / batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(example_input)
    finally:
        model.train(was)
    return int(fc.get_total_flops() // 2 // int(example_input.shape[0]))


def efficiency(original_ms: float, compressed_ms: float, original_macs: float, compressed_macs: float) -> dict:
    """``{"speedup", "mac_reduction", "efficiency"}`` from measured medians and MAC counts (NaN when undefined)."""
    nan = float("nan")
    speedup = original_ms / compressed_ms if compressed_ms > 0 else nan
    reduction = original_macs / compressed_macs if compressed_macs > 0 else nan
    return {"speedup": speedup, "mac_reduction": reduction,
            "efficiency": speedup / reduction if reduction and reduction == reduction else nan}


@dataclass
class BenchResult:
    """Original vs compressed: one ``rows`` entry per (runtime, batch) with both :class:`Latency` dicts,
    speedup, MAC reduction and efficiency; ``layers``: per-layer eager rows for the replaced layers
    (``{runtime, batch, name, original_ms, compressed_ms, macs_before, macs_after, speedup, mac_reduction,
    efficiency}``); ``macs``: whole-model MACs per sample (``FlopCounterMode``)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)
    threads: int = 1
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    def to_markdown(self) -> str:
        """Total and per-layer tables in Markdown."""
        return latency_markdown(self.to_dict())


def latency_markdown(d: dict[str, Any]) -> str:
    """Markdown tables of a :meth:`BenchResult.to_dict` (used by reports and ``rankslim bench``)."""
    lines = [f"Threads: {d.get('threads')}; machine: {d.get('machine', {}).get('cpu', '?')}; "
             "latency = median ms per batch (IQR); efficiency = speedup ÷ MAC reduction", "",
             "| runtime | batch | original ms | compressed ms | speedup | MAC reduction | efficiency | peak mem "
             "original → compressed |", "|---|---|---|---|---|---|---|---|"]

    def mem(v):
        return "-" if v is None else f"{v / 2 ** 20:.1f} MiB"
    for r in d.get("rows", []):
        o, c = r["original"], r.get("compressed")
        if c is None:
            lines.append(f"| {r['runtime']} | {r['batch']} | {o['median_ms']:.3f} ({o['iqr_ms']:.3f}) | - | - | - | - "
                         f"| {mem(o['peak_mem_bytes'])} |")
            continue
        lines.append(f"| {r['runtime']} | {r['batch']} | {o['median_ms']:.3f} ({o['iqr_ms']:.3f}) | "
                     f"{c['median_ms']:.3f} ({c['iqr_ms']:.3f}) | {r['speedup']:.2f}x | {r['mac_reduction']:.2f}x | "
                     f"{r['efficiency']:.2f} | {mem(o['peak_mem_bytes'])} → {mem(c['peak_mem_bytes'])} |")
    if d.get("layers"):
        lines += ["", "| layer | runtime | batch | original ms | compressed ms | speedup | MAC reduction | efficiency |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in d["layers"]:
            lines.append(f"| {r['name']} | {r['runtime']} | {r['batch']} | {r['original_ms']:.3f} | "
                         f"{r['compressed_ms']:.3f} | {r['speedup']:.2f}x | {r['mac_reduction']:.2f}x | "
                         f"{r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages, rounded to 2 decimals: recorded beside every benchmark
    timing, since timings taken while other jobs share the cores are not figures."""
    import os
    return [round(v, 2) for v in os.getloadavg()]


def write_run(out: dict[str, Any], path: Path, started: float) -> None:
    """Stamp a benchmark's results ``out`` with ``load_average_at_end`` and ``seconds`` since ``started``
    (a ``time.perf_counter()`` value) and write them to ``path`` as JSON, atomically (a killed run leaves the
    previous file, never half of one)."""
    from .train.loop import atomic_write_bytes
    out["load_average_at_end"] = load_average()
    out["seconds"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(out, indent=1).encode())


def machine_info() -> dict[str, Any]:
    """CPU model string, core count, torch and onnxruntime versions (what a timing depends on)."""
    from .latency_cache import machine_key
    return machine_key()


def compare(original: nn.Module, compressed: nn.Module | None, input_shape: Sequence[int], *,
            runtimes: Sequence[str] = ("eager",), batches: Sequence[int] = (1,), threads: int = 1,
            warmup: int = 3, repeats: int = 10, per_layer: bool = True,
            layers: Iterable[str] | None = None) -> BenchResult:
    """Measure ``original`` and ``compressed`` (may be ``None``: the original alone) on every runtime and batch.

    ``layers``: names timed per layer in eager mode (default: the layers the compressed model's plan replaced).
    Returns a :class:`BenchResult`; efficiency is computed from the measured medians and ``FlopCounterMode`` MACs.
    """
    for rt in runtimes:
        _check_args(rt, threads, warmup, repeats)
    if compressed is not None and layers is None and per_layer:
        plan = getattr(compressed, "_rankslim_plan", None)
        layers = [lp.name for lp in plan.layers] if plan is not None else []
    layers = list(layers or []) if per_layer and compressed is not None else []
    probe = make_example(input_shape, 1)
    res = BenchResult(threads=threads, machine=machine_info())
    res.macs["original"] = total_macs(original, probe)
    if compressed is not None:
        res.macs["compressed"] = total_macs(compressed, probe)
    lm_o = layer_macs(original, probe, layers) if layers else {}
    lm_c = layer_macs(compressed, probe, layers) if layers else {}
    for rt in runtimes:
        for b in batches:
            x = make_example(input_shape, b)
            lay = layers if rt != "onnxruntime" else None
            lo = measure_latency(original, x, runtime=rt, threads=threads, warmup=warmup, repeats=repeats, layers=lay)
            row: dict[str, Any] = {"runtime": rt, "batch": int(b), "original": lo.to_dict(), "compressed": None}
            if compressed is not None:
                lc = measure_latency(compressed, x, runtime=rt, threads=threads, warmup=warmup, repeats=repeats,
                                     layers=lay)
                row["compressed"] = lc.to_dict()
                row.update(efficiency(lo.median_ms, lc.median_ms, res.macs["original"], res.macs["compressed"]))
                for n in lay or []:
                    e = efficiency(lo.per_layer[n], lc.per_layer[n], lm_o[n], lm_c[n])
                    res.layers.append({"runtime": rt, "batch": int(b), "name": n, "original_ms": lo.per_layer[n],
                                       "compressed_ms": lc.per_layer[n], "macs_before": lm_o[n],
                                       "macs_after": lm_c[n], **e})
            res.rows.append(row)
    return res


def add_latency(report, original: nn.Module, compressed: nn.Module, input_shape: Sequence[int], **kwargs) -> dict:
    """Measure ``original`` vs ``compressed`` (:func:`compare`, same keyword arguments) and store the result in
    ``report.metrics["latency"]`` (shown by ``report.to_markdown()``), next to the fractions of a latency budget
    already there (:mod:`rankslim.latency_budget`).  Returns that dict."""
    d = {**(report.metrics.get("latency") or {}), **compare(original, compressed, input_shape, **kwargs).to_dict()}
    report.metrics["latency"] = d
    return d


__all__ = ["BenchResult", "Latency", "RUNTIMES", "add_latency", "channels_last", "compare", "efficiency", "give_back_memory",
           "latency_markdown", "layer_macs", "machine_info", "make_example", "measure_latency", "measure_onnx",
           "model_bytes", "peak_rss_growth", "reset_peak_rss", "rss_bytes", "torch_threads", "total_macs"]
