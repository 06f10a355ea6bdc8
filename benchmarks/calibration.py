"""Data-aware compression time and peak memory: the per-layer calibration scheme vs the fast one (issue 11).

torchvision ``mobilenet_v2`` (random weights: timings and memory do not depend on them) at 224x224, method
``zhang`` (sequential, data-aware), ``macs=0.5`` (CPTV), seeded random calibration images.  Every configuration
runs in a fresh subprocess so its peak resident memory (``VmHWM``) is its own; the table reports the peak
minus the resident memory just before compression starts (model, calibration images and imports already
loaded), i.e. what compression itself adds.  Two sweeps:

* samples: 32 / 64 / 128 calibration images, all data-aware targets;
* target layers: the first 8 / 16 data-aware targets (ranks at half of full: a MAC budget is out of reach
  with so few targets), 32 images; "all" is the samples sweep's 32-image row.

Each is run with ``Calibrator(scheme="per-layer")`` (today's scheme: one partial forward pass of the work
model per target, quadratic in depth) and ``scheme="fast"`` (fx frontiers: about one forward pass of each
model per batch and sweep).  Timings are wall-clock seconds with ``torch.set_num_threads(threads)``; the
target is 128 images in under 60 s on 2 cores.

    python benchmarks/calibration.py                      # full sweep (run alone on the machine), JSON + docs
    python benchmarks/calibration.py --quick              # small check: 8/16 images, fast scheme + one per-layer
    python benchmarks/calibration.py --docs               # regenerate docs/results/calibration.md from the JSON
    python benchmarks/calibration.py --loaded ...         # mark the figures as measured on a shared, loaded machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "calibration.json"
DOC = ROOT / "docs" / "results" / "calibration.md"


def child(cfg: dict) -> dict:
    """One compression through the stages of :mod:`rankslim.pipeline`; timings per stage and peak memory."""
    import torch
    import torchvision

    import rankslim.calibrate as calibrate
    from rankslim import pipeline
    from rankslim.allocate import Budget, get_allocator
    from rankslim.bench import reset_peak_rss, rss_bytes

    torch.set_num_threads(cfg["threads"])
    calibrate.DEFAULT_SCHEME = cfg["scheme"]
    if cfg.get("cache_limit_mib"):
        calibrate.DEFAULT_CACHE_LIMIT = int(cfg["cache_limit_mib"] * 2**20)
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    shape = (3, cfg["size"], cfg["size"])
    images = torch.randn(cfg["samples"], *shape, generator=torch.Generator().manual_seed(1))
    include = None
    if cfg.get("layers"):
        sel = pipeline.select(model, shape, "zhang")
        include = [t.name for t in sel.targets][: cfg["layers"]]
    base = rss_bytes()[0]
    budget = Budget(macs=cfg["macs"])
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    sel = pipeline.select(model, shape, "zhang", include=include)
    t["select"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cal = pipeline.calibrate(sel, images, calib_samples=cfg["samples"], seed=0,
                             batch_size=cfg.get("batch_size", pipeline.CALIB_BATCH))
    t["calibrate"] = time.perf_counter() - t1
    stage_peak = {"calibrate": rss_bytes()[1] - base}  # each stage's own peak: the counter is reset between stages
    reset_peak_rss()
    t1 = time.perf_counter()
    table = pipeline.cost_table(sel, cal, quantities=budget.quantities)
    # a MAC budget is out of reach with a few targets: the layer sweep keeps half of every rank instead
    allocator = get_allocator("cptv") if include is None else get_allocator("ratio", {"ratio": 0.5})
    alloc = pipeline.allocate(sel, table, allocator, budget if include is None else Budget(), calibration=cal)
    t["allocate"] = time.perf_counter() - t1
    stage_peak["allocate"] = rss_bytes()[1] - base
    reset_peak_rss()
    t1 = time.perf_counter()
    built = pipeline.build(sel, alloc, cal)
    t["build"] = time.perf_counter() - t1
    stage_peak["build"] = rss_bytes()[1] - base
    res = pipeline.finalize(sel, built, alloc, cal, budget=budget if include is None else Budget(), method="zhang",
                            budget_request={"macs": cfg["macs"]} if include is None else {"ratio": 0.5})
    total = time.perf_counter() - t0
    c = cal.calibrator
    frac = res.report.fractions()
    return {**cfg, "targets": len(sel.targets), "decomposed": len(built.layer_plans), "seconds": total,
            "stages": t, "peak_bytes": base + max(stage_peak.values()), "base_bytes": base,
            "added_peak_bytes": max(stage_peak.values()), "stage_added_peak_bytes": stage_peak,
            "scheme_used": c.scheme_used, "nodes_run": c.nodes_run, "restarts": c.restarts,
            "peak_frontier_bytes": c.peak_frontier_bytes, "cache_bytes": c.cache_bytes,
            "batches": len(c.batches), "graph_nodes": len(c._graph.nodes) if c._graph is not None else None,
            "macs_kept": frac["macs"], "params_kept": frac["params"]}


def svd_saving(threads: int) -> dict:
    """One SVD per weight: spectra + allocation and build of torchvision resnet50 (data-free ``svd``, macs 0.5,
    CPTV) with the decomposition cache off and on; wall and CPU seconds, cache hits and bytes held."""
    import torch
    import torchvision

    from rankslim import pipeline
    from rankslim.allocate import Budget, get_allocator
    from rankslim.decompose.svd import SVD_CACHE, SVD_CACHE_BYTES, clear_svd_cache, set_svd_cache_limit

    torch.set_num_threads(threads)
    out: dict = {}
    for limit in (0, SVD_CACHE_BYTES):
        set_svd_cache_limit(limit)
        clear_svd_cache()
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        sel = pipeline.select(model, (3, 224, 224), "svd")
        budget = Budget(macs=0.5)
        t1, c1 = time.perf_counter(), time.process_time()
        table = pipeline.cost_table(sel, None, quantities=budget.quantities)
        alloc = pipeline.allocate(sel, table, get_allocator("cptv"), budget)
        t2, c2 = time.perf_counter(), time.process_time()
        pipeline.build(sel, alloc, None)
        t3, c3 = time.perf_counter(), time.process_time()
        out["cache" if limit else "no_cache"] = {
            "spectra_allocate_wall": t2 - t1, "spectra_allocate_cpu": c2 - c1, "build_wall": t3 - t2,
            "build_cpu": c3 - c2, **SVD_CACHE.info()}
    set_svd_cache_limit(SVD_CACHE_BYTES)
    return out


def run(cfg: dict, timeout: float) -> dict:
    """:func:`child` in a fresh interpreter (its own peak memory); a run past ``timeout`` is recorded as such."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cfg, "timed_out": timeout}
    if p.returncode != 0:
        raise SystemExit(f"configuration {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def write_docs(data: dict) -> None:
    """Generate docs/results/calibration.md from the JSON."""
    loaded = data.get("loaded")
    lines = ["# Calibration: per-layer vs fast scheme", "",
             "Generated by `benchmarks/calibration.py` from `benchmarks/results/calibration.json`.", "",
             "torchvision mobilenet_v2 (random weights), zhang (sequential, data-aware), macs 0.5 (CPTV), "
             f"{data['size']}x{data['size']} inputs, {data['threads']} threads. *seconds*: whole compression "
             "(select → finalize); *calibrate*: the calibration stage (original-input statistics for allocation); "
             "*build*: decomposition with sequential statistics; *added peak*: peak resident memory minus the "
             "resident memory before compression (model and images loaded), MiB; *frontiers*: the most bytes the "
             "fast scheme's frontiers held (bounded by `cache_limit_bytes`, 1 GiB by default), MiB; "
             "*forward passes*: graph nodes run ÷ graph nodes ÷ batches, per model (original + work).", ""]
    if loaded:
        lines += [f"> **Measured under load**: {loaded}. These are not clean timings; compare the schemes "
                  "with each other, not with other tables.", ""]
    lines += ["| sweep | samples | targets | scheme | seconds | calibrate | build | added peak MiB | "
              "frontiers MiB | forward passes (orig + work) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        if "timed_out" in r:
            lines.append(f"| {r['sweep']} | {r['samples']} | {r.get('layers') or 'all'} | {r['scheme']} | "
                         f"> {r['timed_out']:.0f} (stopped) | | | | | |")
            continue
        passes = ""
        if r["scheme_used"] == "fast" and r.get("graph_nodes"):
            per = r["graph_nodes"] * r["batches"]
            passes = f"{r['nodes_run']['original'] / per:.1f} + {r['nodes_run']['work'] / per:.1f}"
        sweep = (f"bounded ({r['cache_limit_mib']:g} MiB, batch {r.get('batch_size', 64)}, {r['threads']} thread(s))"
                 if r.get("cache_limit_mib") else r["sweep"])
        lines.append(f"| {sweep} | {r['samples']} | {r['targets']} | {r['scheme_used']} | {r['seconds']:.1f} | "
                     f"{r['stages']['calibrate']:.1f} | {r['stages']['build']:.1f} | {_mib(r['added_peak_bytes'])} | "
                     f"{_mib(r['peak_frontier_bytes']) if r['scheme_used'] == 'fast' else ''} | {passes} |")
    lines += ["", "Memory: the statistics are streamed (their size depends on the layers only); what grows with the "
              "samples is the fast scheme's frontiers (about 4 MiB per image here, original + work) and the images "
              "themselves. The frontiers never exceed `cache_limit_bytes` (1 GiB by default): past it, the batches "
              "whose frontiers do not fit are recomputed from the input for each target (the per-layer cost, for "
              "those batches only), so the frontiers' memory stays bounded whatever the number of samples. The per-layer scheme's "
              "input cache has the same bound and falls back to re-running the whole original model per target."]
    bounded = [r for r in data["runs"] if r.get("sweep") == "bounded" and "timed_out" not in r]
    if bounded:
        lo, hi = min(bounded, key=lambda r: r["samples"]), max(bounded, key=lambda r: r["samples"])
        image_mib = 3 * data["size"] ** 2 * 4 / 2**20
        grow = (hi["added_peak_bytes"] - lo["added_peak_bytes"]) / 2**20
        inputs = (hi["samples"] - lo["samples"]) * image_mib
        lines += ["", f"The *bounded* rows are what a user gets with `compress(calib_memory_mib={lo['cache_limit_mib']:g}, "
                  f"calib_batch_size={lo.get('batch_size', 64)})` (`--calib-memory {lo['cache_limit_mib']:g} --calib-batch "
                  f"{lo.get('batch_size', 64)}`; `python benchmarks/calibration.py --bounded MIB --calib-batch B`): "
                  f"the frontiers stop at the limit ({_mib(max(r['peak_frontier_bytes'] for r in bounded))} MiB at most) "
                  f"and one batch of {lo.get('batch_size', 64)} images is in flight. From {lo['samples']} to "
                  f"{hi['samples']} samples the added peak goes from {_mib(lo['added_peak_bytes'])} to "
                  f"{_mib(hi['added_peak_bytes'])} MiB (+{grow:,.0f} MiB for {hi['samples'] / lo['samples']:g}x the "
                  f"samples), of which the {hi['samples'] - lo['samples']} extra input images themselves are "
                  f"{inputs:,.0f} MiB (calibration holds its inputs: every layer's statistics need a pass over all "
                  f"of them), and {hi['seconds']:.0f} s at {hi['samples']} samples. Per stage, MiB above the "
                  "starting point: " + "; ".join(
                      f"{r['samples']} samples: " + ", ".join(f"{k} {_mib(v)}" for k, v in
                                                             r.get("stage_added_peak_bytes", {}).items())
                      for r in sorted(bounded, key=lambda r: r["samples"])) + "."]
        if data.get("bounded_note"):
            lines += ["", data["bounded_note"]]
        if data.get("bounded_loaded"):
            lines += ["", f"Bounded rows measured with: {data['bounded_loaded']}."]
    svd = data.get("svd_cache")
    if svd:
        a, b = svd["no_cache"], svd["cache"]
        lines += ["", "## One SVD per weight", "",
                  "torchvision resnet50 (random weights), data-free `svd`, macs 0.5 (CPTV), "
                  f"{svd.get('threads', data['threads'])} threads: the spectra for allocation and the decompositions "
                  "with the decomposition cache off and on (`rankslim.decompose.svd.SVD_CACHE`; "
                  "`python benchmarks/calibration.py --svd`).", "",
                  "| cache | spectra + allocate (s, wall / CPU) | build (s, wall / CPU) | hits | held MiB |",
                  "|---|---|---|---|---|"]
        for label, r in (("off", a), ("on", b)):
            lines.append(f"| {label} | {r['spectra_allocate_wall']:.1f} / {r['spectra_allocate_cpu']:.1f} | "
                         f"{r['build_wall']:.1f} / {r['build_cpu']:.1f} | {r['hits']} | {_mib(r['bytes'])} |")
        lines += ["", "With the cache the spectrum computes the thin SVD once (on this torch build `svdvals` "
                  "is no faster than `svd` with vectors) and the decomposition reuses it."]
        if svd.get("loaded"):
            lines += ["", f"> **Measured under load**: {svd['loaded']}."]
    lines += ["", f"Measured on: {data['env']}.", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs table from the JSON")
    ap.add_argument("--quick", action="store_true", help="small check (8/16 images, 112x112)")
    ap.add_argument("--samples", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="target-layer counts (0 = all)")
    ap.add_argument("--schemes", nargs="+", default=["per-layer", "fast"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a configuration is stopped")
    ap.add_argument("--loaded", default=None, help="say the machine was shared (text shown in the docs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bounded", type=float, default=None, metavar="MIB",
                    help="only the fast scheme at --samples with cache_limit_bytes = MIB (merged into the JSON)")
    ap.add_argument("--calib-batch", type=int, default=16, help="calibration batch size of the --bounded rows")
    ap.add_argument("--svd", action="store_true", help="only measure the SVD cache on resnet50 (merged into the JSON)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.svd:
        data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": [], "size": 224,
                                                                          "threads": args.threads, "env": {}}
        data["svd_cache"] = {**svd_saving(args.threads), "threads": args.threads, "loaded": args.loaded,
                             "load_average": os.getloadavg()}
        args.out.write_text(json.dumps(data, indent=2))
        write_docs(data)
        return
    if args.docs:
        write_docs(json.loads(args.out.read_text()))
        return
    if args.bounded is not None:
        data = json.loads(args.out.read_text())
        data["runs"] = [r for r in data["runs"] if r.get("sweep") != "bounded"]
        for n in args.samples or [32, 64, 128]:
            cfg = {"sweep": "bounded", "samples": n, "layers": 0, "scheme": "fast", "cache_limit_mib": args.bounded,
                   "size": data["size"], "threads": args.threads, "macs": 0.5, "batch_size": args.calib_batch}
            r = run(cfg, args.timeout)
            r["load_average"] = os.getloadavg()
            data["runs"].append(r)
            print(json.dumps({k: r.get(k) for k in ("samples", "seconds", "added_peak_bytes",
                                                   "peak_frontier_bytes", "timed_out")}), flush=True)
        data["bounded_loaded"] = args.loaded
        args.out.write_text(json.dumps(data, indent=2))
        write_docs(data)
        return
    import torch
    size = args.size or (112 if args.quick else 224)
    samples = args.samples or ([8, 16] if args.quick else [32, 64, 128])
    layers = args.layers or ([8] if args.quick else [8, 16, 0])
    configs = []
    for scheme in args.schemes:
        for n in samples:
            configs.append({"sweep": "samples", "samples": n, "layers": 0})
            configs[-1]["scheme"] = scheme
        for nl in layers:
            if nl:  # "all targets" at the smallest sample count is already in the samples sweep
                configs.append({"sweep": "layers", "samples": min(samples), "layers": nl, "scheme": scheme})
    out = {"env": {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_average_at_start": os.getloadavg()},
           "size": size, "threads": args.threads, "loaded": args.loaded, "runs": []}
    if args.out.exists():  # the SVD-cache figures (--svd) survive a new sweep
        prev = json.loads(args.out.read_text())
        if "svd_cache" in prev:
            out["svd_cache"] = prev["svd_cache"]
    for cfg in configs:
        cfg.update(size=size, threads=args.threads, macs=0.5)
        r = run(cfg, args.timeout)
        out["runs"].append(r)
        print(json.dumps({k: r.get(k) for k in ("sweep", "samples", "layers", "scheme", "seconds", "stages",
                                               "added_peak_bytes", "timed_out")}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(args.out)
    out["env"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(out, indent=2))
    if args.out == RESULTS:
        write_docs(out)


if __name__ == "__main__":
    main()
