"""Measured speed of compressed models: MAC-only, speed-aware and latency-budget allocation, eager and ONNX Runtime,
batch 1 and 32.

Models: torchvision resnet50, mobilenet_v2, vgg16 (random weights: no pretrained weights offline; 224x224) and the
zoo models (trained: accuracy reported), each at a fraction 0.5 and 0.3 with the data-free SVD method (output head
kept dense).  For every (model, fraction, runtime, batch), three allocations:

* **mac-only**: ``compress(macs=F, speed_aware=False)``: the default allocator (``cptv``) on the MAC budget;
* **speed-aware**: ``compress(macs=F, speed_aware={runtime, batch, threads})``: the same exact MAC budget, a layer
  factorized only at ranks measured faster than dense on that runtime and batch, then the time-aware step (the
  fastest allocation by the layer timings with no larger error proxy than cptv's, :mod:`rankslim.allocate.timed`):
  what ``speed_aware="auto"``, the default, does when measuring is cheap.  When no such allocation meets the MAC budget the row says
  *infeasible* (auto then falls back to mac-only);
* **latency**: ``compress(latency=F, speed_aware={...})``: the model's MEASURED time at most F of the original's
  (:mod:`rankslim.latency_budget`); its MACs are whatever that takes. *infeasible* with the smallest reachable
  fraction when the measurements cannot reach F.

Reported: median latency (ms per batch) of original and compressed, speedup, MAC reduction, efficiency = speedup ÷
MAC reduction, and accuracy where weights are trained.  Run it ALONE on an idle machine (timings of a shared
machine are meaningless); the load average is recorded with every row:

    python benchmarks/speed.py [--max-minutes M]      # full run: writes benchmarks/results/speed.json + docs
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

import rankslim
from rankslim.bench import (efficiency, load_average, machine_info, make_example, measure_latency, total_macs,
                            write_run)
from rankslim.errors import BudgetError
from rankslim.whole_model import time_models
from rankslim.zoo import ZOO, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
DOC = ROOT / "docs" / "results" / "speed.md"
PLOT = ROOT / "docs" / "results" / "speed.png"
KINDS = ("mac-only", "speed-aware", "latency")
#: seconds of alternated timing per row (both models, all rounds; at least 3 calls per model per round)
ROW_SECONDS = 12.0

FULL = {"models": ["torchvision:resnet50", "torchvision:mobilenet_v2", *[f"zoo:{n}" for n in sorted(ZOO)],
                   "torchvision:vgg16"],
        "budgets": [0.5, 0.3], "runtimes": ["eager", "onnxruntime"], "batches": [1, 32], "threads": None,
        # batch 32 of ResNet-50/VGG-16 takes seconds per call on 2 cores: fewer repeats there (median of 7)
        "warmup": {"1": 5, "32": 2}, "repeats": {"1": 30, "32": 7}, "grid": 8, "eval_samples": None}
SMOKE = {"models": ["zoo:lenet5"], "budgets": [0.5], "runtimes": ["eager", "onnxruntime"], "batches": [1],
         "threads": 1, "warmup": 1, "repeats": 2, "grid": 3, "eval_samples": 200}


def compress_kind(spec: str, model, shape, frac: float, kind: str, speed: dict[str, Any], grid: int):
    """``(CompressionResult | None, reason)``: ``model`` compressed with SVD at ``frac`` by allocation ``kind``."""
    common = dict(input_shape=shape, keep_head=True)
    try:
        if kind == "mac-only":
            return rankslim.compress(model, "svd", macs=frac, speed_aware=False, **common), None
        opts = {**speed, "samples": grid}
        if kind == "speed-aware":
            return rankslim.compress(model, "svd", macs=frac, speed_aware=opts, **common), None
        return rankslim.compress(model, "svd", latency=frac, speed_aware=opts, **common), None
    except BudgetError as exc:
        return None, str(exc)


def _per_batch(value: int | dict, batch: int) -> int:
    return int(value[str(batch)]) if isinstance(value, dict) else int(value)



def run(cfg: dict, out_path: Path, max_minutes: float | None = None) -> dict:
    """Measure every configuration in ``cfg`` and write the JSON to ``out_path`` after each row (atomically).

    With ``max_minutes``, configurations not started by then are listed under ``not_run`` instead of measured.
    """
    from rankslim.data import evaluate_accuracy, load_dataset

    t_start = time.perf_counter()
    threads = cfg["threads"] or torch.get_num_threads()
    out: dict[str, Any] = {"machine": machine_info(), "threads": threads, "config": cfg, "rows": [], "not_run": [],
                           "load_average_at_start": load_average()}

    for spec_str in cfg["models"]:
        spec = resolve_model(spec_str)
        shape = spec.input_shape
        test = load_dataset(spec.dataset, "test") if spec.dataset is not None else None
        accuracy: dict[int, float] = {}

        def acc_of(model) -> float | None:
            if test is None:
                return None
            if id(model) not in accuracy:
                accuracy[id(model)] = evaluate_accuracy(model, test, max_samples=cfg["eval_samples"])
            return accuracy[id(model)]

        probe = make_example(shape, 1)
        macs_original = total_macs(spec.model, probe)
        for frac in cfg["budgets"]:
            mac_only = None
            for rt in cfg["runtimes"]:
                for b in cfg["batches"]:
                    if max_minutes is not None and time.perf_counter() - t_start > 60 * max_minutes:
                        out["not_run"].append({"model": spec_str, "macs_budget": frac, "runtime": rt, "batch": b})
                        write_run(out, out_path, t_start)
                        continue
                    speed = {"runtime": rt, "batch": b, "threads": threads}
                    timing = dict(runtime=rt, threads=threads, warmup=_per_batch(cfg["warmup"], b),
                                  repeats=_per_batch(cfg["repeats"], b))
                    x = make_example(shape, b)
                    original = measure_latency(spec.model, x, **timing)
                    for kind in KINDS:
                        t0 = time.perf_counter()
                        if kind == "mac-only":
                            if mac_only is None:
                                mac_only = compress_kind(spec_str, spec.model, shape, frac, kind, speed, cfg["grid"])
                            res, why = mac_only
                        else:
                            res, why = compress_kind(spec_str, spec.model, shape, frac, kind, speed, cfg["grid"])
                        seconds = time.perf_counter() - t0
                        row: dict[str, Any] = {
                            "model": spec_str, "macs_budget": frac, "allocation": kind, "runtime": rt, "batch": b,
                            "threads": threads, "original_ms": original.median_ms,
                            "original_iqr_ms": original.iqr_ms, "accuracy_before": acc_of(spec.model),
                            "compress_seconds": round(seconds, 2), "load_average": load_average()}
                        if res is None:
                            row["infeasible"] = why
                        else:
                            # original and compressed ALTERNATE (ROUNDS rounds): timing the original once per
                            # model and the compressed models after it let drift in the machine's speed into the
                            # ratio (ResNet-50 eager-cl b32: 1.74x that way, 1.48x alternated)
                            (o_ms, c_ms), calls = time_models([spec.model, res.model], probe, runtime=rt, batch=b,
                                                              threads=threads, check_seconds=ROW_SECONDS)
                            m = res.report.metrics
                            row.update({"original_ms": o_ms, "compressed_ms": c_ms, "timing": "alternated",
                                        "timed_calls": calls, "original_once_ms": original.median_ms,
                                        **efficiency(o_ms, c_ms, macs_original, total_macs(res.model, probe)),
                                        "accuracy_after": acc_of(res.model),
                                        "dense_layers": sum(1 for r in res.report.rows if not r.replaced),
                                        "allocation_mode": m.get("allocation_mode"),
                                        "whole_model_check": [
                                            {"margin": t["margin"], "speedup": round(t["speedup"], 3)}
                                            for t in (m.get("whole_model") or {}).get("tried", [])],
                                        "latency_budget": {k: v for k, v in (m.get("latency") or {}).items()
                                                           if k in ("requested", "predicted", "measured")}})
                            row["macs_kept"] = 1.0 / row["mac_reduction"]
                        out["rows"].append(row)
                        print(json.dumps(row), flush=True)
                        write_run(out, out_path, t_start)
    write_run(out, out_path, t_start)
    return out


def row_key(r: dict) -> tuple:
    """What one configuration is keyed by, in rows and ``not_run`` entries alike: (model, budget, runtime, batch)."""
    return r["model"], r["macs_budget"], r["runtime"], r["batch"]


def drop_measured_not_run(data: dict) -> None:
    """Remove the ``not_run`` entries whose (model, budget, runtime, batch) has rows: after ``--merge`` an earlier run
    may have measured what this one left out (and duplicates go)."""
    have = {row_key(r) for r in data["rows"]}
    seen, keep = set(), []
    for n in data["not_run"]:
        key = row_key(n)
        if key not in have and key not in seen:
            seen.add(key)
            keep.append(n)
    data["not_run"] = keep


def docs(data: dict, md_path: Path = DOC, png_path: Path = PLOT) -> None:
    """Write the Markdown table and the speedup plot from a results dict."""
    m = data["machine"]
    lines = ["# Measured speed (generated by `benchmarks/speed.py`)", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}, onnxruntime "
             f"{m.get('onnxruntime')}; {data['threads']} thread(s). Latency: median ms per batch. Each compressed model is "
             "timed alternately with its original in 3 rounds (`rankslim.whole_model.time_models`, about 12 s per row), "
             "so a drift in the machine's speed hits both; rows marked † come from runs before this was done, where "
             "the original was timed once per model, runtime and batch and each compressed model right after (that "
             "way ResNet-50 eager-cl b32 speed-aware measured 1.74x, alternated 1.48x: treat † speedups as "
             "±15%). Runtimes: eager, eager-cl (channels-last PyTorch), onnxruntime. Efficiency = speedup ÷ MAC "
             "reduction. Allocations: *mac-only* (cptv on the MAC budget), *speed-aware* (the same MAC budget, a "
             "layer factorized only at ranks measured faster than dense, then the time-aware step: the fastest "
             "allocation by the layer timings whose error proxy is no larger than cptv's, which may keep fewer MACs "
             "than the budget; the default when measuring is cheap; rows marked ‡ were measured before the "
             "time-aware step existed), "
             "*latency* (`compress(latency=F)`: measured time at most F of the original's). SVD, output head dense, "
             "no fine-tuning, no BatchNorm re-estimation and the stem conv compressed: the accuracies are those of "
             "raw data-free SVD at these budgets (the README's main job keeps the stem, re-estimates BN and "
             "fine-tunes), shown to compare allocations, not as usable models. "
             + ("glibc's malloc thresholds are fixed for the whole run (`rankslim.bench.fix_heap_thresholds`: "
                "otherwise a small model's batch-1 latency depended on what the process ran before, e.g. ResNet-20 "
                "2.0 ms, then 4.8 ms after a model was evaluated at batch 256). "
                if data["config"].get("heap_thresholds_fixed") else "")
             + "Speed-aware rows are checked as a "
             "whole model by `compress` (`rankslim/whole_model.py`): where the model built at the 5% layer margin was "
             "not 1.02x faster, the margins tried and their measured speedups are shown after the speedup, and a "
             "budget with no faster model is *infeasible* (speed-aware mode refuses to return a slower model)."
             + (f" Rows of {', '.join(data['merged_from_earlier_runs'])} come from an earlier run of this script "
                "with the same settings, merged with `--merge`." if data.get("merged_from_earlier_runs") else ""),
             "",
             "| model | F | allocation | runtime | batch | original ms | compressed ms | speedup | MACs kept | "
             "efficiency | accuracy before → after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        head = f"| {r['model']} | {r['macs_budget']} | {r['allocation']} | {r['runtime']} | {r['batch']} | " \
               f"{r['original_ms']:.2f} | "
        if "infeasible" in r:
            import re
            got = re.search(r"smallest (?:reachable is|time fraction the measurements allow is) ([0-9.]+)", r["infeasible"])
            whole = re.search(r"best: whole model measured ([0-9.]+)x", r["infeasible"])
            why = (f" (smallest reachable {float(got.group(1)):.2f})" if got else
                   f" (whole model never faster: best {float(whole.group(1)):.2f}x)" if whole else "")
            lines.append(head + "infeasible" + why + " | | | | |")
            continue
        acc = "-" if r["accuracy_after"] is None else \
            f"{100 * r['accuracy_before']:.1f}% → {100 * r['accuracy_after']:.1f}%"
        check = r.get("whole_model_check") or []
        note = (" (check: " + ", ".join(f"{100 * t['margin']:.0f}% {t['speedup']:.2f}x" for t in check) + ")"
                if len(check) > 1 else "")
        dagger = ("" if r.get("timing") == "alternated" else " †") + (" ‡" if before_time_aware(r) else "")
        lines.append(head + f"{r['compressed_ms']:.2f} | {r['speedup']:.2f}x{dagger}{note} | {100 * r['macs_kept']:.0f}% | "
                     f"{r['efficiency']:.2f} | {acc} |")
    done = [r for r in data["rows"] if "infeasible" not in r]
    slower = [r for r in done if r["speedup"] < 1.0]
    lines += ["", f"Compressed models slower than their original: {len(slower)} of {len(done)}"
              + (": " + "; ".join(f"{r['model']} {r['macs_budget']} {r['allocation']} {r['runtime']} b{r['batch']} "
                                 f"({r['speedup']:.2f}x)" for r in slower) if slower else "") + "."]
    for kind in KINDS:
        ks = [r for r in done if r["allocation"] == kind]
        if ks:
            effs = sorted(r["efficiency"] for r in ks)
            lines.append(f"- {kind}: median efficiency {effs[len(effs) // 2]:.2f} over {len(ks)} rows, "
                         f"{sum(r['speedup'] < 1.0 for r in ks)} slower than the original, "
                         f"{sum(1 for r in data['rows'] if r['allocation'] == kind and 'infeasible' in r)} infeasible.")
    target = [r for r in done if r["model"] == "torchvision:resnet50" and r["macs_budget"] == 0.5 and r["batch"] == 32]
    if target:
        lines += ["", "Target (issue 11): efficiency >= 0.8 for ResNet-50 at macs 0.5, batch 32: "
                  + "; ".join(f"{r['allocation']} {r['runtime']} {r['efficiency']:.2f}"
                              f"{'' if r.get('timing') == 'alternated' else ' †'}{' ‡' if before_time_aware(r) else ''}"
                              f" ({'met' if r['efficiency'] >= 0.8 else 'not met'})" for r in target) + "."]
    if data.get("not_run"):
        lines += ["", "Not measured (out of the run's time: `--max-minutes` reached, left out with `--batches` (VGG-16 at batch 32: about 6 s per eager call here, from 32 x the 178 ms of batch 1; the layer timing grid at batch 32 would take tens of minutes), or stopped by hand): "
                  + "; ".join(f"{r['model']} {r['macs_budget']} {r['runtime']} b{r['batch']}" for r in data["not_run"])
                  + "."]
    prev_path = RESULTS.with_name("speed.run1.json")
    if md_path == DOC and prev_path.exists():
        prev = {(r["model"], r["macs_budget"], r["allocation"], r["runtime"], r["batch"]): r
                for r in json.loads(prev_path.read_text())["rows"] if "infeasible" not in r}
        pairs = [(r, prev[k]) for r in done
                 if (k := (r["model"], r["macs_budget"], r["allocation"], r["runtime"], r["batch"])) in prev]
        if pairs:
            ratio = sorted(max(a["speedup"], b["speedup"]) / min(a["speedup"], b["speedup"]) for a, b in pairs)
            worst = max(pairs, key=lambda p: max(p[0]["speedup"], p[1]["speedup"]) / min(p[0]["speedup"],
                                                                                         p[1]["speedup"]))
            lines += ["", f"**Repeatability.** The same rows measured in an earlier run "
                      f"(`benchmarks/results/speed.run1.json`, same machine and settings, glibc thresholds not fixed) "
                      f"differ in speedup by a median factor of {ratio[len(ratio) // 2]:.2f} over {len(pairs)} rows "
                      f"(largest: {worst[0]['model']} {worst[0]['macs_budget']} {worst[0]['allocation']} "
                      f"{worst[0]['runtime']} b{worst[0]['batch']}, {worst[1]['speedup']:.2f}x then "
                      f"{worst[0]['speedup']:.2f}x). On this shared 2-core virtual machine a single run's speedups "
                      "are good to about that factor; read differences smaller than it as noise."]
    lines += ["", f"Load average at start / end: {data.get('load_average_at_start')} / "
              f"{data.get('load_average_at_end')} (per row in the JSON); {data.get('seconds', 0) / 60:.0f} minutes."]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys((r["model"], r["macs_budget"], r["runtime"], r["batch"]) for r in data["rows"]))
    fig, ax = plt.subplots(figsize=(max(9, 0.45 * len(keys)), 4.5))
    width = 0.8 / len(KINDS)
    for i, kind in enumerate(KINDS):
        vals = []
        for k in keys:
            got = [r for r in done if r["allocation"] == kind and (r["model"], r["macs_budget"], r["runtime"],
                                                                      r["batch"]) == k]
            vals.append(got[0]["speedup"] if got else 0.0)
        ax.bar([x + (i - 1) * width for x in range(len(keys))], vals, width, label=kind)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{k[0].split(':')[-1]} {k[1]} {k[2][:4]} b{k[3]}" for k in keys],
                  rotation=70, fontsize=7)
    ax.set_ylabel("measured speedup (0 = infeasible)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def before_time_aware(row: dict[str, Any]) -> bool:
    """A speed-aware row measured before compress() had the time-aware step (its allocation_mode lacks the record)."""
    return row.get("allocation") == "speed-aware" and "time_aware" not in (row.get("allocation_mode") or {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds); write to --out, not the docs")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs from --out")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new configuration after this many minutes (the rest is listed as not run)")
    ap.add_argument("--models", default=None, help="comma-separated model specs (default: the full list)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,32)")
    ap.add_argument("--budgets", default=None, help="comma-separated MAC fractions (default: 0.5,0.3)")
    ap.add_argument("--runtimes", default=None, help="comma-separated runtimes (default: eager,onnxruntime; "
                    "eager-cl: channels-last PyTorch)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the existing JSON's rows of other models / budgets / runtimes / batches and replace "
                    "only those measured now")
    args = ap.parse_args()
    out_path = args.out or RESULTS
    if args.smoke and args.out is None:
        raise SystemExit("--smoke needs --out (smoke timings are not figures: keep them out of benchmarks/results)")
    if args.docs:
        data = json.loads(out_path.read_text())
        if out_path == RESULTS:
            docs(data)
        else:  # the docs hold only the committed results; other JSON files get their tables beside them
            docs(data, out_path.with_suffix(".md"), out_path.with_suffix(".png"))
        return
    from rankslim.bench import fix_heap_thresholds
    # latencies must not depend on what this process ran before (see fix_heap_thresholds): every row is timed with
    # the same allocator settings, original and compressed alike
    heap_fixed = fix_heap_thresholds()
    cfg = dict(SMOKE if args.smoke else FULL)
    cfg["heap_thresholds_fixed"] = heap_fixed
    if args.models:
        cfg["models"] = [m for m in args.models.split(",") if m]
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",") if b]
    if args.runtimes:
        cfg["runtimes"] = [r for r in args.runtimes.split(",") if r]
    if args.budgets:
        cfg["budgets"] = [float(f) for f in args.budgets.split(",") if f]
    old = json.loads(out_path.read_text()) if args.merge and out_path.exists() else None
    data = run(cfg, out_path, args.max_minutes)
    skipped = [b for b in FULL["batches"] if b not in cfg["batches"]]
    data["not_run"] += [{"model": mdl, "macs_budget": f, "runtime": rt, "batch": b, "why": "--batches"}
                        for mdl in cfg["models"] for f in cfg["budgets"] for rt in cfg["runtimes"] for b in skipped]
    data["not_run"] += [{"model": mdl, "macs_budget": f, "runtime": rt, "batch": b, "why": "--budgets"}
                        for mdl in cfg["models"] for f in FULL["budgets"] if f not in cfg["budgets"]
                        for rt in cfg["runtimes"] for b in cfg["batches"]]
    if old is not None:
        measured = {row_key(r) for r in data["rows"]}
        kept = [r for r in old["rows"] if row_key(r) not in measured]
        data["rows"] = kept + data["rows"]
        data["merged_from_earlier_runs"] = sorted({r["model"] for r in kept})
        data["not_run"] = old.get("not_run", []) + data["not_run"]
        drop_measured_not_run(data)
        from rankslim.train.loop import atomic_write_bytes
        atomic_write_bytes(out_path, json.dumps(data, indent=1).encode())
    if args.smoke:
        docs(data, out_path.with_suffix(".md"), out_path.with_suffix(".png"))
    else:
        docs(data)


if __name__ == "__main__":
    main()
