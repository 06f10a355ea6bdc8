"""Measured speed of compressed models: MAC-only vs speed-aware allocation, eager and ONNX Runtime, batch 1 and 32.

Models: torchvision resnet50, vgg16, mobilenet_v2 (random weights: no pretrained weights offline; 224x224) and the
zoo models (trained: accuracy reported), each at ``macs`` 0.5 and 0.3 with the data-free SVD method (output head
kept dense).  For every (model, budget, runtime, batch):

* **MAC-only**: the default allocator (``cptv``) on the MAC budget;
* **speed-aware**: the same allocator on a cost table whose MAC costs are each layer's MEASURED time at sampled
  ranks on that runtime and batch (:func:`rankslim.latency_cache.speed_aware_table`; cached on disk), ranks
  snapped to the fastest sampled rank at or above them (:func:`rankslim.latency_cache.snap_ranks`).  Its
  budget is on measured time, so its MAC count may differ from the request (both are reported).

Reported: median latency (ms per batch) of original and compressed, speedup, MAC reduction, efficiency = speedup ÷
MAC reduction, and accuracy where weights are trained.  Run it ALONE on an idle machine (timings of a shared
machine are meaningless):

    python benchmarks/speed.py                       # full run: writes benchmarks/results/speed.json + docs
    python benchmarks/speed.py --docs                # regenerate docs/results/speed.md + speed.png from the JSON
    python benchmarks/speed.py --smoke --out /tmp/speed.json   # seconds: checks the script works (no figures)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from rankslim.allocate import Allocation, Budget
from rankslim.bench import compare, machine_info
from rankslim.errors import BudgetError
from rankslim.latency_cache import LatencyCache, fastest_ranks, snap_ranks, speed_aware_table
from rankslim.pipeline import allocate, build, calibrate, choose_allocator, cost_table, finalize, select
from rankslim.zoo import ZOO, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
DOC = ROOT / "docs" / "results" / "speed.md"
PLOT = ROOT / "docs" / "results" / "speed.png"

FULL = {"models": ["torchvision:resnet50", "torchvision:vgg16", "torchvision:mobilenet_v2",
                   *[f"zoo:{n}" for n in sorted(ZOO)]],
        "budgets": [0.5, 0.3], "runtimes": ["eager", "onnxruntime"], "batches": [1, 32], "threads": None,
        "warmup": 5, "repeats": 30, "grid": 8, "eval_samples": None}
SMOKE = {"models": ["zoo:lenet5"], "budgets": [0.5], "runtimes": ["eager", "onnxruntime"], "batches": [1],
         "threads": 1, "warmup": 1, "repeats": 2, "grid": 3, "eval_samples": 200}


def compress_one(model, shape, macs: float, *, speed: dict | None, cache: LatencyCache, grid: int,
                 spec: str | None = None):
    """Compress ``model`` to ``macs`` with SVD: MAC-only (``speed=None``) or speed-aware on ``speed``
    (``{"runtime", "batch", "threads"}``).  Returns ``(CompressionResult, seconds spent measuring)``."""
    budget = Budget(macs=macs)
    alloc = choose_allocator(budget, None, None, None, None, None)
    sel = select(model, shape, "svd", keep_head=True, spec=spec)
    cal = calibrate(sel, None)
    table = cost_table(sel, cal, quantities=("macs",))
    t_measure = 0.0
    measured: dict[str, Any] = {}
    if speed is not None:
        t0 = time.perf_counter()
        table, measured = speed_aware_table(sel, table, runtime=speed["runtime"], batch=speed["batch"],
                                            threads=speed["threads"], samples=grid, cache=cache)
        t_measure = time.perf_counter() - t0
    if speed is None:
        allocation = allocate(sel, table, alloc, budget)
    else:
        try:
            allocation = allocate(sel, table, alloc, budget)
            allocation = Allocation(snap_ranks(table, allocation, measured, budget), info=allocation.info)
        except BudgetError:  # the measured time cannot shrink that much: the fastest model measured instead
            allocation = Allocation(fastest_ranks(table, measured), info={"allocator": "fastest-measured"})
    built = build(sel, allocation, cal)
    # the speed-aware budget is on measured time, so the built model's MACs are not held to the request
    result = finalize(sel, built, allocation, cal, budget=budget if speed is None else Budget(), method="svd",
                      budget_request={"macs": macs})
    result.report.metrics["allocation"] = "MAC-only" if speed is None else f"speed-aware ({speed['runtime']}, " \
                                                                          f"batch {speed['batch']})"
    return result, t_measure


def run(cfg: dict, out_path: Path) -> dict:
    """Measure every configuration in ``cfg`` and write the JSON to ``out_path`` after each model."""
    threads = cfg["threads"] or torch.get_num_threads()
    cache = LatencyCache()
    out: dict[str, Any] = {"machine": machine_info(), "threads": threads, "config": cfg, "rows": []}
    for spec_str in cfg["models"]:
        spec = resolve_model(spec_str)
        shape = spec.input_shape
        acc_before = None
        test = None
        if spec.dataset is not None:
            from rankslim.data import evaluate_accuracy, load_dataset
            test = load_dataset(spec.dataset, "test")
            acc_before = evaluate_accuracy(spec.model, test, max_samples=cfg["eval_samples"])
        for macs in cfg["budgets"]:
            mac_only, _ = compress_one(spec.model, shape, macs, speed=None, cache=cache, grid=cfg["grid"], spec=spec_str)
            for rt in cfg["runtimes"]:
                for b in cfg["batches"]:
                    speed = {"runtime": rt, "batch": b, "threads": threads}
                    aware, t_meas = compress_one(spec.model, shape, macs, speed=speed, cache=cache, grid=cfg["grid"],
                                                 spec=spec_str)
                    for kind, res in (("mac-only", mac_only), ("speed-aware", aware)):
                        d = compare(spec.model, res.model, shape, runtimes=(rt,), batches=(b,), threads=threads,
                                    warmup=cfg["warmup"], repeats=cfg["repeats"], per_layer=False).to_dict()
                        row = d["rows"][0]
                        acc = None
                        if test is not None:
                            from rankslim.data import evaluate_accuracy
                            acc = evaluate_accuracy(res.model, test, max_samples=cfg["eval_samples"])
                        out["rows"].append({
                            "model": spec_str, "macs_budget": macs, "allocation": kind, "runtime": rt, "batch": b,
                            "threads": threads, "original_ms": row["original"]["median_ms"],
                            "original_iqr_ms": row["original"]["iqr_ms"],
                            "compressed_ms": row["compressed"]["median_ms"],
                            "compressed_iqr_ms": row["compressed"]["iqr_ms"], "speedup": row["speedup"],
                            "mac_reduction": row["mac_reduction"], "efficiency": row["efficiency"],
                            "macs_kept": 1.0 / row["mac_reduction"], "accuracy_before": acc_before,
                            "accuracy_after": acc, "measure_seconds": t_meas if kind == "speed-aware" else 0.0,
                            "dense_layers": sum(1 for r in res.report.rows if not r.replaced)})
                        print(json.dumps(out["rows"][-1]), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))
    return out


def docs(data: dict, md_path: Path = DOC, png_path: Path = PLOT) -> None:
    """Write the Markdown table and the speedup plot from a results dict."""
    lines = ["# Measured speed (generated by `benchmarks/speed.py`)", "",
             f"Machine: {data['machine'].get('cpu')} ({data['machine'].get('cores')} cores), torch "
             f"{data['machine'].get('torch')}, onnxruntime {data['machine'].get('onnxruntime')}; {data['threads']} "
             "thread(s). Latency: median ms per batch. Efficiency = speedup ÷ MAC reduction.", "",
             "| model | macs | allocation | runtime | batch | original ms | compressed ms | speedup | MACs kept | "
             "efficiency | accuracy before → after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        acc = "-" if r["accuracy_after"] is None else f"{100 * r['accuracy_before']:.1f}% → {100 * r['accuracy_after']:.1f}%"
        lines.append(f"| {r['model']} | {r['macs_budget']} | {r['allocation']} | {r['runtime']} | {r['batch']} | "
                     f"{r['original_ms']:.2f} | {r['compressed_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{100 * r['macs_kept']:.0f}% | {r['efficiency']:.2f} | {acc} |")
    slower = [r for r in data["rows"] if r["speedup"] < 1.0]
    lines += ["", f"Compressed models slower than their original: {len(slower)} of {len(data['rows'])}."]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    labels, mac_only, aware = [], [], []
    keys = sorted({(r["model"], r["macs_budget"], r["runtime"], r["batch"]) for r in data["rows"]})
    for k in keys:
        sel = {r["allocation"]: r["speedup"] for r in data["rows"]
               if (r["model"], r["macs_budget"], r["runtime"], r["batch"]) == k}
        labels.append(f"{k[0].split(':')[-1]} {k[1]} {k[2][:4]} b{k[3]}")
        mac_only.append(sel.get("mac-only", 0.0))
        aware.append(sel.get("speed-aware", 0.0))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], mac_only, 0.4, label="MAC-only")
    ax.bar([x + 0.2 for x in xs], aware, 0.4, label="speed-aware")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=70, fontsize=7)
    ax.set_ylabel("measured speedup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds); write to --out, not the docs")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs from --out")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args()
    out_path = args.out or RESULTS
    if args.smoke and args.out is None:
        raise SystemExit("--smoke needs --out (smoke timings are not figures: keep them out of benchmarks/results)")
    if args.docs:
        docs(json.loads(out_path.read_text()))
        return
    data = run(SMOKE if args.smoke else FULL, out_path)
    if args.smoke:
        docs(data, out_path.with_suffix(".md"), out_path.with_suffix(".png"))
    else:
        docs(data)


if __name__ == "__main__":
    main()
