"""Measured speed of compressed models: MAC-only vs speed-aware allocation, eager and ONNX Runtime, batch 1 and 32.

Models: torchvision resnet50, vgg16, mobilenet_v2 (random weights: no pretrained weights offline; 224x224) and the
zoo models (trained: accuracy reported), each at ``macs`` 0.5 and 0.3 with the data-free SVD method (output head
kept dense).  For every (model, budget, runtime, batch):

* **MAC-only**: the default allocator (``cptv``) on the MAC budget;
* **speed-aware**: the same allocator under a LATENCY budget of the same fraction, i.e. ``compress(latency=...)``'s
  allocation (:mod:`rankslim.latency_budget`): each layer's MEASURED time at sampled ranks on that runtime and batch
  (cached on disk) plus the measured rest of the model, ranks standing for the fastest measured rank at or above
  them.  Its budget is on measured time, so its MAC count may differ from the request (both are reported); when
  the measurements cannot reach the fraction, the smallest fraction they allow is used (``time_fraction_used``).

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

from rankslim.allocate import Budget
from rankslim.bench import compare, machine_info
from rankslim.latency_budget import allocate_latency, latency_model
from rankslim.latency_cache import LatencyCache
from rankslim.pipeline import allocate, build, calibrate, choose_allocator, cost_table, finalize, select
from rankslim.zoo import ZOO, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
DOC = ROOT / "docs" / "results" / "speed.md"
PLOT = ROOT / "docs" / "results" / "speed.png"

FULL = {"models": ["torchvision:resnet50", "torchvision:mobilenet_v2", *[f"zoo:{n}" for n in sorted(ZOO)],
                   "torchvision:vgg16"],
        "budgets": [0.5, 0.3], "runtimes": ["eager", "onnxruntime"], "batches": [1, 32], "threads": None,
        # batch 32 of ResNet-50/VGG-16 takes seconds per call on 2 cores: fewer repeats there (median of 7)
        "warmup": {"1": 5, "32": 2}, "repeats": {"1": 30, "32": 7}, "grid": 8, "eval_samples": None}
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
    t_measure, used, predicted = 0.0, macs, None
    if speed is None:
        allocation = allocate(sel, table, alloc, budget)
    else:
        model_t = latency_model(sel, table, runtime=speed["runtime"], batch=speed["batch"], threads=speed["threads"],
                                samples=grid, cache=cache)
        t_measure = model_t.seconds
        # The measured time cannot always shrink that much: then the SMALLEST fraction the measurements allow (a hair
        # above, so the float round trip through the integer time table still fits) instead of a refusal
        used = max(macs, min(1.0, model_t.smallest + 1e-6))
        allocation = allocate_latency(sel, model_t, alloc, used)
        predicted = model_t.fraction(allocation)
    built = build(sel, allocation, cal)
    # the speed-aware budget is on measured time, so the built model's MACs are not held to the request
    result = finalize(sel, built, allocation, cal, budget=budget if speed is None else Budget(), method="svd",
                      budget_request={"macs": macs})
    result.report.metrics["allocation"] = "MAC-only" if speed is None else f"speed-aware ({speed['runtime']}, " \
                                                                          f"batch {speed['batch']})"
    result.report.metrics["time_fraction_used"] = macs if speed is None else used
    result.report.metrics["time_fraction_predicted"] = predicted
    return result, t_measure


def _per_batch(value: int | dict, batch: int) -> int:
    return int(value[str(batch)]) if isinstance(value, dict) else int(value)


def _load() -> list[float]:
    import os
    return [round(x, 2) for x in os.getloadavg()]


def run(cfg: dict, out_path: Path, max_minutes: float | None = None) -> dict:
    """Measure every configuration in ``cfg`` and write the JSON to ``out_path`` after each row (atomically).

    With ``max_minutes``, configurations not started by then are listed under ``not_run`` instead of measured.
    """
    from rankslim.train.loop import atomic_write_bytes

    t_start = time.perf_counter()
    threads = cfg["threads"] or torch.get_num_threads()
    cache = LatencyCache()
    out: dict[str, Any] = {"machine": machine_info(), "threads": threads, "config": cfg, "rows": [], "not_run": [],
                           "load_average_at_start": _load()}

    def save() -> None:
        out["load_average_at_end"] = _load()
        out["seconds"] = round(time.perf_counter() - t_start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_path, json.dumps(out, indent=1).encode())

    for spec_str in cfg["models"]:
        spec = resolve_model(spec_str)
        shape = spec.input_shape
        acc_before = None
        test = None
        accuracy: dict[int, float | None] = {}
        if spec.dataset is not None:
            from rankslim.data import evaluate_accuracy, load_dataset
            test = load_dataset(spec.dataset, "test")
            acc_before = evaluate_accuracy(spec.model, test, max_samples=cfg["eval_samples"])

        def acc_of(res) -> float | None:
            if test is None:
                return None
            if id(res) not in accuracy:
                from rankslim.data import evaluate_accuracy
                accuracy[id(res)] = evaluate_accuracy(res.model, test, max_samples=cfg["eval_samples"])
            return accuracy[id(res)]

        for macs in cfg["budgets"]:
            mac_only = None
            for rt in cfg["runtimes"]:
                for b in cfg["batches"]:
                    if max_minutes is not None and time.perf_counter() - t_start > 60 * max_minutes:
                        out["not_run"].append({"model": spec_str, "macs_budget": macs, "runtime": rt, "batch": b})
                        save()
                        continue
                    if mac_only is None:
                        mac_only, _ = compress_one(spec.model, shape, macs, speed=None, cache=cache,
                                                   grid=cfg["grid"], spec=spec_str)
                    speed = {"runtime": rt, "batch": b, "threads": threads}
                    aware, t_meas = compress_one(spec.model, shape, macs, speed=speed, cache=cache, grid=cfg["grid"],
                                                 spec=spec_str)
                    for kind, res in (("mac-only", mac_only), ("speed-aware", aware)):
                        load = _load()
                        d = compare(spec.model, res.model, shape, runtimes=(rt,), batches=(b,), threads=threads,
                                    warmup=_per_batch(cfg["warmup"], b), repeats=_per_batch(cfg["repeats"], b),
                                    per_layer=False).to_dict()
                        row = d["rows"][0]
                        out["rows"].append({
                            "model": spec_str, "macs_budget": macs, "allocation": kind, "runtime": rt, "batch": b,
                            "threads": threads, "original_ms": row["original"]["median_ms"],
                            "original_iqr_ms": row["original"]["iqr_ms"],
                            "compressed_ms": row["compressed"]["median_ms"],
                            "compressed_iqr_ms": row["compressed"]["iqr_ms"], "speedup": row["speedup"],
                            "mac_reduction": row["mac_reduction"], "efficiency": row["efficiency"],
                            "macs_kept": 1.0 / row["mac_reduction"], "accuracy_before": acc_before,
                            "accuracy_after": acc_of(res), "measure_seconds": t_meas if kind == "speed-aware" else 0.0,
                            "dense_layers": sum(1 for r in res.report.rows if not r.replaced),
                            "time_fraction_used": res.report.metrics.get("time_fraction_used"),
                            "time_fraction_predicted": res.report.metrics.get("time_fraction_predicted"),
                            "load_average": load})
                        print(json.dumps(out["rows"][-1]), flush=True)
                        save()
    save()
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
    lines += ["", f"Compressed models slower than their original: {len(slower)} of {len(data['rows'])}"
              + (": " + "; ".join(f"{r['model']} {r['macs_budget']} {r['allocation']} {r['runtime']} b{r['batch']} "
                                 f"({r['speedup']:.2f}x)" for r in slower) if slower else "") + "."]
    target = [r for r in data["rows"] if r["model"] == "torchvision:resnet50" and r["macs_budget"] == 0.5
              and r["batch"] == 32]
    if target:
        lines += ["", "Target (issue 11): efficiency >= 0.8 for ResNet-50 at macs 0.5, batch 32: "
                  + "; ".join(f"{r['allocation']} {r['runtime']} {r['efficiency']:.2f}"
                              f" ({'met' if r['efficiency'] >= 0.8 else 'not met'})" for r in target) + "."]
    if data.get("not_run"):
        lines += ["", "Not measured (the run's time limit, `--max-minutes`, was reached first): "
                  + "; ".join(f"{r['model']} {r['macs_budget']} {r['runtime']} b{r['batch']}" for r in data["not_run"])
                  + "."]
    lines += ["", f"Load average at start / end: {data.get('load_average_at_start')} / "
              f"{data.get('load_average_at_end')} (per row in the JSON); run alone on the machine."]
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
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new configuration after this many minutes (the rest is listed as not run)")
    ap.add_argument("--models", default=None, help="comma-separated model specs (default: the full list)")
    args = ap.parse_args()
    out_path = args.out or RESULTS
    if args.smoke and args.out is None:
        raise SystemExit("--smoke needs --out (smoke timings are not figures: keep them out of benchmarks/results)")
    if args.docs:
        docs(json.loads(out_path.read_text()))
        return
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.models:
        cfg["models"] = [m for m in args.models.split(",") if m]
    data = run(cfg, out_path, args.max_minutes)
    if args.smoke:
        docs(data, out_path.with_suffix(".md"), out_path.with_suffix(".png"))
    else:
        docs(data)


if __name__ == "__main__":
    main()
