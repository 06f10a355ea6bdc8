"""Measured per-layer latency at candidate ranks, cached on disk, and speed-aware cost tables built from it.

**Cache.** One JSON file per key under ``$RANKSLIM_CACHE_DIR`` (default ``~/.cache/rankslim/latency/``), named
by the SHA-256 of the key.  The key holds everything a timing depends on: the machine (CPU model string, core
count, architecture), the torch and onnxruntime versions, the runtime, dtype, batch and thread count, the
method and the layer geometry (type, weight shape, stride, padding, dilation, groups, bias, input shape).
Changing any part gives another file, so stale timings are never read; a file whose stored key differs from
the one asked for (collision, hand edit) or that does not parse is a miss and is rewritten.

**Speed-aware allocation.** :func:`speed_aware_table` replaces, in a :class:`~rankslim.allocate.CostTable`,
each target's MAC cost by its MEASURED time expressed in MAC-equivalents: ``dense_macs × t(r) / t_dense``,
``t`` measured at a few sampled ranks (``rank_grid``) and interpolated linearly in between.  Allocators then
spend a MAC budget on measured time, each layer's relative time weighted by its dense MACs (the untouched layers
counted by MACs: not a fraction of the model's time — :mod:`rankslim.latency_budget` builds that); a layer whose factorized form is not measurably faster than dense at any rank is never
factorized (``CostTable.worth_it``: strictly cheaper).  :func:`snap_ranks` then raises each chosen rank to
the sampled rank at or above it with the least measured time (ranks the kernels favour, e.g. multiples of 8),
when the budget still fits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import RankslimError

#: environment variable naming the cache directory (default ``~/.cache/rankslim/latency``)
CACHE_ENV = "RANKSLIM_CACHE_DIR"
CACHE_VERSION = 1
#: untimed calls before, and timed calls of, each layer form :func:`measure_layer` times (the timing loop adds one
#: peak-memory pass, so a form runs ``WARMUP + 1 + REPEATS`` times)
WARMUP = 2
REPEATS = 7


def cache_dir() -> Path:
    """The latency cache directory: ``$RANKSLIM_CACHE_DIR`` or ``~/.cache/rankslim/latency``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rankslim" / "latency"


def cpu_model() -> str:
    """The CPU model string (``/proc/cpuinfo`` "model name", else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key() -> dict[str, Any]:
    """``{"cpu", "cores", "arch", "torch", "onnxruntime"}``: the machine and software a timing depends on."""
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except Exception:  # onnxruntime missing: eager timings are still keyed
        ort_version = None
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "arch": platform.machine(),
            "torch": torch.__version__, "onnxruntime": ort_version}


def layer_geometry(module: nn.Module, in_shape: Sequence[int]) -> dict[str, Any]:
    """What a layer's speed depends on: type, weight shape, conv hyper-parameters, bias, per-sample input shape."""
    g: dict[str, Any] = {"type": type(module).__name__, "in_shape": [int(s) for s in in_shape]}
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        g["weight"] = list(w.shape)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
        v = getattr(module, attr, None)
        if v is not None:
            g[attr] = list(v) if isinstance(v, tuple) else v
    g["bias"] = getattr(module, "bias", None) is not None
    return g


@dataclass(frozen=True)
class LatencyKey:
    """Everything a cached timing depends on; equal keys mean interchangeable timings."""

    geometry: Mapping[str, Any]
    method: str
    runtime: str = "eager"
    dtype: str = "float32"
    batch: int = 1
    threads: int = 1
    machine: Mapping[str, Any] = field(default_factory=machine_key)

    def to_dict(self) -> dict[str, Any]:
        """The key as plain JSON-able data (what the cache file records)."""
        return json.loads(json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(self)}, sort_keys=True,
                                     default=str))

    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON: the cache file name."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


class LatencyCache:
    """Per-key JSON files ``{"key": ..., "dense": ms | null, "ranks": {rank: ms}}`` under ``root``.

    ``get`` returns ``None`` on a miss (no file, unreadable file, stored key different from the asked one);
    ``put`` merges new timings into the file, written to a temporary name and renamed.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: LatencyKey) -> Path:
        """The file holding ``key``'s timings."""
        return self.root / f"{key.digest()}.json"

    def get(self, key: LatencyKey) -> dict[str, Any] | None:
        """``{"dense": ms | None, "ranks": {int: ms}}`` for ``key``, or ``None`` (miss / invalidated)."""
        p = self.path(key)
        try:
            d = json.loads(p.read_text())
            if d.get("key") != key.to_dict():
                return None
            ranks = {int(r): float(v) for r, v in d.get("ranks", {}).items()}
            dense = d.get("dense")
            return {"dense": None if dense is None else float(dense), "ranks": ranks}
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def put(self, key: LatencyKey, ranks: Mapping[int, float], dense: float | None = None) -> Path:
        """Store timings (ms) for ``key``, merged with those already cached for it."""
        old = self.get(key) or {"dense": None, "ranks": {}}
        merged = {**old["ranks"], **{int(r): float(v) for r, v in ranks.items()}}
        d = {"key": key.to_dict(), "dense": dense if dense is not None else old["dense"],
             "ranks": {str(r): v for r, v in sorted(merged.items())}}
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
        os.replace(tmp, p)
        return p

    def measure(self, key: LatencyKey, ranks: Iterable[int], time_rank: Callable[[int], float],
                time_dense: Callable[[], float] | None = None) -> dict[str, Any]:
        """Timings of ``ranks`` (and dense) for ``key``: cached ones reused, missing ones measured and stored."""
        have = self.get(key) or {"dense": None, "ranks": {}}
        missing = [int(r) for r in ranks if int(r) not in have["ranks"]]
        new = {r: float(time_rank(r)) for r in missing}
        dense = have["dense"]
        new_dense = None
        if dense is None and time_dense is not None:
            dense = new_dense = float(time_dense())
        if new or new_dense is not None:
            self.put(key, new, new_dense)
        return {"dense": dense, "ranks": {**have["ranks"], **new}}


# -------------------------------------------------------------------------------------- measuring


def rank_grid(max_rank: int, samples: int = 8, multiple: int = 8) -> list[int]:
    """Sampled candidate ranks: about ``samples`` ranks spread geometrically over ``[1, max_rank]``, rounded to
    ``multiple`` where that is at least the multiple (kernels are usually fastest there), plus ``max_rank``."""
    if max_rank < 1:
        return []
    out = {1, max_rank}
    for i in range(1, samples):
        r = max_rank ** (i / samples)
        r = int(round(r / multiple) * multiple) if r >= multiple else int(round(r))
        out.add(max(1, min(max_rank, r)))
    return sorted(out)


def _time_module(module: nn.Module, x: torch.Tensor, runtime: str, threads: int, warmup: int, repeats: int) -> float:
    from .bench import measure_latency
    return measure_latency(module, x, runtime=runtime, threads=threads, warmup=warmup, repeats=repeats).median_ms


def layer_at_rank(method, target, r: int, seed: int = 0) -> nn.Module:
    """A layer of ``method``'s structure at knob ``r`` for timing: built empty from ``{"rank": r}`` and filled with
    small random values when the method can (values do not change its speed), else decomposed for real."""
    gen = torch.Generator().manual_seed(seed)
    try:
        layer = method.structure(target.module, {"rank": int(r)})
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return layer.eval()
    except Exception:  # methods whose structure needs more than a rank (Tucker-2, TT, L + S)
        from .methods import DecomposeContext
        layer, _ = method.decompose(target, int(r), DecomposeContext(generator=gen, options=dict(method.config)))
        return layer.eval()


def latency_key(method, target, *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                dtype: torch.dtype = torch.float32) -> LatencyKey:
    """The cache key :func:`measure_layer` files ``target``'s timings under (``method``'s form, on ``runtime``)."""
    return LatencyKey(layer_geometry(target.module, target.in_shape), method.name, runtime,
                      str(dtype).replace("torch.", ""), int(batch), int(threads))


def missing_measurements(method, target, ranks: Iterable[int], *, runtime: str = "eager", batch: int = 1,
                         threads: int = 1, dtype: torch.dtype = torch.float32,
                         cache: LatencyCache | None = None) -> tuple[bool, list[int]]:
    """What :func:`measure_layer` would have to time: ``(dense missing, ranks missing)``; reads the cache only."""
    cache = cache if cache is not None else LatencyCache()
    have = cache.get(latency_key(method, target, runtime=runtime, batch=batch, threads=threads, dtype=dtype))
    if have is None:
        return True, [int(r) for r in ranks]
    return have["dense"] is None, [int(r) for r in ranks if int(r) not in have["ranks"]]


def measure_layer(method, target, ranks: Iterable[int], *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                  dtype: torch.dtype = torch.float32, warmup: int = WARMUP, repeats: int = REPEATS,
                  cache: LatencyCache | None = None) -> dict[str, Any]:
    """Median ms of ``target``'s dense layer and of ``method``'s layer at each of ``ranks``, timed alone on a
    random ``(batch, *target.in_shape)`` input on ``runtime`` — cached in ``cache`` (default: the user cache)."""
    cache = cache if cache is not None else LatencyCache()
    key = latency_key(method, target, runtime=runtime, batch=batch, threads=threads, dtype=dtype)
    x = torch.randn(int(batch), *target.in_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return cache.measure(
        key, ranks, lambda r: _time_module(layer_at_rank(method, target, r), x, runtime, threads, warmup, repeats),
        lambda: _time_module(target.module, x, runtime, threads, warmup, repeats))


def interpolate(times: Mapping[int, float], r: int) -> float:
    """Measured time at rank ``r``: linear between the sampled ranks around it (constant beyond the ends)."""
    pts = sorted(times.items())
    if not pts:
        raise RankslimError("no measured ranks to interpolate")
    if r <= pts[0][0]:
        return pts[0][1]
    for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
        if r <= r1:
            return t0 + (t1 - t0) * (r - r0) / (r1 - r0)
    return pts[-1][1]


# ------------------------------------------------------------------------------ speed-aware allocation


def measure_targets(selection, table, *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                    samples: int = 8, multiple: int = 8, warmup: int = WARMUP, repeats: int = REPEATS,
                    cache: LatencyCache | None = None) -> dict[str, dict[str, Any]]:
    """:func:`measure_layer` for every layer of ``table`` at its :func:`rank_grid`:
    ``{layer: {"dense": ms, "ranks": {rank: ms}}}`` (cached on disk)."""
    targets = {t.name: t for t in selection.targets}
    return {lo.name: measure_layer(selection.methods[lo.name], targets[lo.name],
                                   rank_grid(lo.max_rank, samples, multiple), runtime=runtime, batch=batch,
                                   threads=threads, warmup=warmup, repeats=repeats, cache=cache)
            for lo in table.layers}


def time_model_ms(model: nn.Module, x: torch.Tensor, *, runtime: str = "eager", threads: int = 1,
                  warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median ms of one call of a whole ``model`` on ``x`` (not cached: a model has no geometry key).  Timed by
    the same function as the layers, so the two are comparable (and tests fake both at one place)."""
    return float(_time_module(model, x, runtime, threads, warmup, repeats))


def speed_aware_table(selection, table, *, runtime: str = "eager", batch: int = 1, threads: int = 1,
                      samples: int = 8, multiple: int = 8, warmup: int = WARMUP, repeats: int = REPEATS,
                      cache: LatencyCache | None = None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """A copy of ``table`` whose MAC costs are measured times in MAC-equivalents (see the module docstring).

    ``selection``: the :class:`~rankslim.pipeline.Selection` the table was made from.  Returns the new table and
    ``{layer: {"dense": ms, "ranks": {rank: ms}}}`` (the measurements, for :func:`snap_ranks` and reports).
    Parameter costs are unchanged.  Each layer has its own scale (its dense MACs per dense ms), so a sum over
    layers is a MAC-weighted sum of relative times, not a time: :mod:`rankslim.latency_budget` builds a table on
    one common time scale for budgets on the whole model's measured time.
    """
    from .allocate import CostTable
    from .cost import Cost

    measured = measure_targets(selection, table, runtime=runtime, batch=batch, threads=threads, samples=samples,
                               multiple=multiple, warmup=warmup, repeats=repeats, cache=cache)
    options = []
    for lo in table.layers:
        dense_ms, times = measured[lo.name]["dense"], measured[lo.name]["ranks"]
        scale = lo.dense.macs / dense_ms if dense_ms and dense_ms > 0 else 0.0

        def cost_fn(r: int, lo=lo, times=times, scale=scale) -> Cost:
            return Cost(lo.cost_fn(r).params, int(math.ceil(scale * interpolate(times, r))))
        options.append(dataclasses.replace(lo, cost_fn=cost_fn))
    new = CostTable(options, table.original, round_to=table.round_to, quantities=table.quantities)
    return new, measured


def fastest_at_or_above(times: Mapping[int, float], r: int, max_rank: int, step: int = 1) -> int:
    """The rank at or above ``r`` with the least measured time: ``r`` itself (interpolated) or a sampled rank up to
    ``max_rank`` that is a multiple of ``step`` (or ``max_rank``); the largest such rank on ties (more rank, same
    time).  A higher rank only adds accuracy, so a rank can always be raised to it."""
    here = interpolate(times, r)
    better = [(t, -s) for s, t in times.items()
              if r <= s <= max_rank and (s % step == 0 or s == max_rank) and t <= here]
    return -min(better)[1] if better else r


def snap_ranks(table, ranks: Mapping[str, int | None], measured: Mapping[str, Mapping[str, Any]],
               budget=None) -> dict[str, int | None]:
    """Raise each chosen rank to the sampled rank at or above it with the least measured time (largest such rank
    on ties), keeping a change only while ``table.fits(..., budget)`` (when a budget is given)."""
    out = dict(ranks)
    for lo in table.layers:
        r = out.get(lo.name)
        times = measured.get(lo.name, {}).get("ranks", {})
        if r is None or not times:
            continue
        s = fastest_at_or_above(times, r, lo.max_rank)
        if s == r:
            continue
        trial = {**out, lo.name: s}
        if budget is None or table.fits(trial, budget):
            out = trial
    return out


def fastest_ranks(table, measured: Mapping[str, Mapping[str, Any]]) -> dict[str, int | None]:
    """Each layer at its measured-fastest sampled rank when that is faster than dense (largest rank on ties),
    else dense: the fastest model the measurements know of, for a time budget that cannot be met."""
    out: dict[str, int | None] = {}
    for lo in table.layers:
        m = measured.get(lo.name, {})
        times = {r: t for r, t in m.get("ranks", {}).items() if lo.min_rank <= r <= lo.max_rank}
        best = min(times.items(), key=lambda kv: (kv[1], -kv[0]), default=None)
        out[lo.name] = best[0] if best is not None and m.get("dense") and best[1] < m["dense"] else None
    return out


__all__ = ["CACHE_ENV", "REPEATS", "WARMUP", "fastest_at_or_above", "fastest_ranks", "LatencyCache", "LatencyKey",
           "cache_dir", "cpu_model", "interpolate", "layer_at_rank", "latency_key", "layer_geometry", "machine_key",
           "measure_layer", "measure_targets", "missing_measurements", "rank_grid", "snap_ranks", "speed_aware_table",
           "time_model_ms"]
