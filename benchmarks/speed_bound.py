"""How fast can a MAC budget make a model?  The fastest rank allocation the layer timings allow, built and timed.

Issue 11 asks for efficiency (measured speedup ÷ MAC reduction) >= 0.8 for ResNet-50 at macs 0.5, batch 32.  The
allocations of ``benchmarks/speed.py`` minimise the approximation error; this script asks the other question:
ignoring accuracy entirely, what is the FASTEST model any rank allocation can build at that MAC budget?  If even
that model falls short, no allocator can meet the target on this machine with these kernels.

For one model, runtime and batch:

1. every target layer is timed alone, dense and factorized (SVD / channel decomposition) at a grid of ranks
   (``rankslim.latency_budget.latency_model``: the latency cache, the same timings speed-aware mode uses), and the
   whole original model once;
2. per budget F, a MILP (SciPy HiGHS) picks for every layer dense or one sampled rank, minimising the modelled time
   ``T_rest + sum_i t_i`` subject to the model keeping between F - 0.01 and F of the original's MACs (MACs of each
   choice from the cost table): efficiency compares speed at one MAC fraction, and without the floor the fastest
   model is every layer at rank 1;
3. that model, the MAC-only model (``compress(macs=F, speed_aware=False)``, the default allocator) and the original
   are built and timed alternately (``whole_model.time_models``); MACs are counted on the built models with
   ``FlopCounterMode``.

It also records, for every layer geometry, the factorized layer's time and MACs as fractions of the dense layer's
at each sampled rank: the per-layer efficiency that caps the whole model's.

    python benchmarks/speed_bound.py                  # resnet50, macs 0.5 and 0.3, onnxruntime + eager-cl, batch 32
    python benchmarks/speed_bound.py --docs           # regenerate docs/results/speed_bound.md from the JSON
    python benchmarks/speed_bound.py --smoke --out /tmp/bound.json   # seconds: checks the script works (no figures)

Run it ALONE: timings of a shared machine are not figures.  torchvision weights are random (no pretrained weights offline), so
no accuracy is reported for them (the zoo ViT is trained: its accuracy is); the bound allocation ignores accuracy by
construction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rankslim  # noqa: E402
from rankslim.bench import (efficiency, load_average, machine_info, make_example, total_macs,  # noqa: E402
                            write_run)
from rankslim.data import evaluate_accuracy, load_dataset  # noqa: E402
from rankslim.latency_budget import latency_model  # noqa: E402
from rankslim.pipeline import cost_table, select  # noqa: E402
from rankslim.whole_model import time_models  # noqa: E402
from rankslim.zoo import resolve_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "speed_bound.json"
DOC = ROOT / "docs" / "results" / "speed_bound.md"
FULL = {"models": ["torchvision:resnet50", "zoo:vit"], "budgets": [0.5, 0.3],
        "runtimes": ["onnxruntime", "eager-cl"], "batch": 32, "samples": 12, "threads": None, "check_seconds": 30,
        "latencies": {"0.5": [0.6, 0.55], "0.3": [0.4, 0.35]}, "eval_samples": 2000}
FLOOR_GAP = 0.01  # the fastest model keeps between F - 0.01 and F of the original's MACs
SMOKE = {"models": ["zoo:resnet20"], "budgets": [0.5], "runtimes": ["eager"], "batch": 2, "samples": 4,
         "threads": 1, "check_seconds": 0.5, "latencies": {"0.5": [0.9]}, "eval_samples": 100}


def fastest_allocation(choices: dict[str, list[tuple[int | None, int, float]]], mac_limit: float,
                       mac_floor: float = -np.inf) -> dict[str, int | None] | None:
    """The choice per layer minimising total time with ``mac_floor <= total MACs <= mac_limit`` (MILP, SciPy
    HiGHS).  The floor matters: without it the fastest model is every layer at rank 1, which says nothing about
    what F of the MACs can buy.

    ``choices``: ``{layer: [(rank or None for dense, macs, ms), ...]}``.  Returns ``{layer: rank or None}``, or
    ``None`` when no combination fits.
    """
    from rankslim.allocate.choice import ChoiceRow, solve_choice

    names = list(choices)
    res = solve_choice([np.array([ms for _, _, ms in choices[n]]) for n in names],
                       [ChoiceRow([np.array([float(m) for _, m, _ in choices[n]]) for n in names], mac_floor,
                                  mac_limit)])
    if res.choice is None:
        return None
    return {n: choices[n][k][0] for n, k in zip(names, res.choice)}


def layer_fractions(sel, table, measured) -> list[dict[str, Any]]:
    """Per target layer geometry: dense ms and, per sampled rank, MAC and time fractions of the dense layer."""
    rows: dict[tuple, dict[str, Any]] = {}
    by_name = table.by_name()
    for t in sel.targets:
        lo, m = by_name[t.name], measured[t.name]
        w = t.module.weight
        key = (type(t.module).__name__, tuple(w.shape), tuple(t.in_shape), getattr(t.module, "stride", None))
        if key in rows:
            rows[key]["layers"].append(t.name)
            continue
        dense_ms, dense_macs = float(m["dense"]), lo.dense.macs
        rows[key] = {"layers": [t.name], "type": key[0], "weight": list(key[1]), "in_shape": list(key[2]),
                     "stride": list(key[3]) if key[3] is not None else None, "dense_ms": dense_ms,
                     "dense_macs": dense_macs,
                     "ranks": {int(r): {"mac_fraction": lo.cost_fn(int(r)).macs / dense_macs,
                                        "time_fraction": float(ms) / dense_ms}
                               for r, ms in sorted(m["ranks"].items(), key=lambda kv: int(kv[0]))}}
    return list(rows.values())


def output_error(original: torch.nn.Module, compressed: torch.nn.Module, input_shape, n: int = 8) -> float:
    """``||f_c(x) - f(x)|| / ||f(x)||`` over ``n`` random inputs (seeded): how far the compressed model's outputs
    are from the original's, measured on the models, for models without trained weights or test data."""
    x = make_example(input_shape, n, seed=1)
    with torch.no_grad():
        y, yc = original.eval()(x), compressed.eval()(x)
    return float(torch.linalg.vector_norm(yc - y) / torch.linalg.vector_norm(y))



def run(cfg: dict[str, Any], out_path: Path) -> dict[str, Any]:
    """Measure every (model, runtime) of ``cfg`` and write the JSON to ``out_path``."""
    t_start = time.perf_counter()
    threads = int(cfg["threads"] or torch.get_num_threads())
    out: dict[str, Any] = {"machine": machine_info(), "threads": threads, "config": cfg, "rows": [], "layers": [],
                           "load_average_at_start": load_average()}
    b = int(cfg["batch"])

    for spec_str in cfg["models"]:
        spec = resolve_model(spec_str)
        test = load_dataset(spec.dataset, "test") if spec.dataset is not None else None

        def acc_of(model: torch.nn.Module) -> float | None:
            return None if test is None else evaluate_accuracy(model, test, max_samples=int(cfg["eval_samples"]))
        accuracy_before = acc_of(spec.model)
        probe = make_example(spec.input_shape, 1)
        macs_original = total_macs(spec.model, probe)
        # the working copy is never modified here (models are built by compress), so one selection serves all runtimes
        sel = select(spec.model, spec.input_shape, "svd", keep_head=True)
        table = cost_table(sel, quantities=("macs",))
        by_name = table.by_name()
        target_dense_macs = sum(lo.dense.macs for lo in table.layers)
        for rt in cfg["runtimes"]:
            lm = latency_model(sel, table, runtime=rt, batch=b, threads=threads, samples=int(cfg["samples"]))
            out["layers"].append({"model": spec_str, "runtime": rt, "batch": b,
                                  "geometries": layer_fractions(sel, table, lm.measured)})
            for frac in cfg["budgets"]:
                choices = {}
                for name, m in lm.measured.items():
                    lo = by_name[name]
                    choices[name] = [(None, lo.dense.macs, float(m["dense"]))] + [
                        (int(r), lo.cost_fn(int(r)).macs, float(ms)) for r, ms in m["ranks"].items()]
                # the MAC limit on the targets: the budget minus what the rest of the model (stem, head) costs
                rest = sel.counted_macs - target_dense_macs
                limit = frac * sel.original_cost.macs - rest
                # efficiency compares speed at the SAME MAC fraction: keep F of the MACs (to 1% of the model)
                ranks = fastest_allocation(choices, limit, limit - FLOOR_GAP * sel.original_cost.macs)
                row: dict[str, Any] = {"model": spec_str, "runtime": rt, "batch": b, "threads": threads,
                                       "macs_budget": frac, "samples": int(cfg["samples"]),
                                       "original_model_ms_once": lm.original_ms, "rest_ms": lm.rest_ms,
                                       "targets_dense_ms": lm.targets_dense_ms, "load_average": load_average()}
                if ranks is None:
                    row["infeasible"] = "no allocation of the sampled ranks meets the MAC budget"
                    out["rows"].append(row)
                    continue
                speed = {"runtime": rt, "batch": b, "threads": threads, "samples": int(cfg["samples"])}
                built: dict[str, Any] = {
                    "fastest": rankslim.compress(spec.model, "svd", ranks={n: r for n, r in ranks.items() if r},
                                                 input_shape=spec.input_shape, keep_head=True, speed_aware=False),
                    "mac-only": rankslim.compress(spec.model, "svd", macs=frac, input_shape=spec.input_shape,
                                                  keep_head=True, speed_aware=False)}
                infeasible = {}
                for lat in cfg["latencies"].get(str(frac), []):
                    try:  # the least-error model meeting both: what a user gets from compress(macs=F, latency=L)
                        built[f"macs+latency {lat:g}"] = rankslim.compress(
                            spec.model, "svd", macs=frac, latency=lat, input_shape=spec.input_shape, keep_head=True,
                            speed_aware=speed)
                    except rankslim.errors.BudgetError as exc:
                        infeasible[f"macs+latency {lat:g}"] = str(exc)
                names = list(built)
                ms, calls = time_models([spec.model, *(built[n].model for n in names)], probe, runtime=rt, batch=b,
                                        threads=threads, check_seconds=float(cfg["check_seconds"]))
                o_ms = ms[0]
                row.update({"original_ms": o_ms, "timed_calls": calls, "timing": "alternated",
                            "accuracy_before": accuracy_before, "allocations": {}, "infeasible_allocations": infeasible})
                for n, c_ms in zip(names, ms[1:]):
                    res = built[n]
                    alloc = ranks if n == "fastest" else {k: res.allocation.get(k) for k in lm.measured}
                    c_macs = total_macs(res.model, probe)
                    row["allocations"][n] = {
                        "ms": c_ms, "predicted_fraction": lm.fraction(alloc), "macs_kept": c_macs / macs_original,
                        "dense_layers": sum(1 for r in alloc.values() if r is None),
                        "output_rel_error": output_error(spec.model, res.model, spec.input_shape),
                        "accuracy_after": acc_of(res.model), **efficiency(o_ms, c_ms, macs_original, c_macs),
                        **({"ranks": ranks} if n == "fastest" else {})}
                out["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "allocations"} | {"allocations": {
                    n: {k: v for k, v in a.items() if k != "ranks"} for n, a in row["allocations"].items()}}),
                    flush=True)
                write_run(out, out_path, t_start)
    write_run(out, out_path, t_start)
    return out


def _geometry_label(g: dict[str, Any]) -> str:
    w = g["weight"]
    k = f"{w[2]}x{w[3]}" if len(w) == 4 else "fc"
    stride = f" s{g['stride'][0]}" if g.get("stride") and g["stride"][0] != 1 else ""
    return f"{k} {w[1]}→{w[0]} @{g['in_shape'][-1]}{stride}"


def docs(data: dict[str, Any], md_path: Path = DOC) -> None:
    """``docs/results/speed_bound.md`` from the JSON (tables only)."""
    m = data["machine"]
    lines = ["# How fast can a MAC budget be? (generated by `benchmarks/speed_bound.py`)", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}, onnxruntime "
             f"{m.get('onnxruntime')}; {data['threads']} thread(s); load average at start / end "
             f"{data.get('load_average_at_start')} / {data.get('load_average_at_end')}; {data.get('seconds', 0) / 60:.0f}"
             " minutes. torchvision models have random weights (no pretrained weights offline): no accuracy for them; "
             "the zoo models are trained (accuracy on Fashion-MNIST test images). The *fastest* allocation ignores "
             "accuracy by construction.", "",
             "**fastest**: per layer, dense or one sampled SVD rank, chosen by a MILP (SciPy HiGHS) to minimise the "
             "additive time model (every layer timed alone, `rankslim.latency_budget`) keeping between F − 0.01 and F of "
             "the MACs. "
             "**mac-only**: `compress(macs=F, speed_aware=False)` (the default allocator, `cptv`, minimising the "
             "approximation error). The original and both models are timed alternately in 3 rounds "
             "(`whole_model.time_models`); MACs counted by `FlopCounterMode` on the built models.", "",
             "**macs+latency L**: `compress(macs=F, latency=L, speed_aware={runtime, batch, threads})`, the "
             "least-error model (cptv) that keeps at most F of the MACs AND is predicted to take at most L of the "
             "time. *output error*: ‖f̂(x) − f(x)‖ / ‖f(x)‖ over 8 random inputs; *accuracy*: Fashion-MNIST test "
             "images (zoo models, trained weights).", "",
             "| model | runtime | batch | F | allocation | predicted time | original ms | compressed ms | speedup | "
             "MACs kept | efficiency | dense layers | output error | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        head = f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['macs_budget']} |"
        if "infeasible" in r:
            lines.append(f"{head} - | {r['infeasible']} | | | | | | | | |")
            continue
        for kind, d in r["allocations"].items():
            acc = "-" if d.get("accuracy_after") is None else \
                f"{100 * r['accuracy_before']:.1f}% → {100 * d['accuracy_after']:.1f}%"
            lines.append(f"{head} {kind} | {d['predicted_fraction']:.2f} | {r['original_ms']:.1f} | {d['ms']:.1f} | "
                         f"{d['speedup']:.2f}x | {100 * d['macs_kept']:.0f}% | **{d['efficiency']:.2f}** | "
                         f"{d['dense_layers']} | {d['output_rel_error']:.3f} | {acc} |")
        for kind, why in r.get("infeasible_allocations", {}).items():
            lines.append(f"{head} {kind} | infeasible: {why.split(': ', 1)[-1][:160]} | | | | | | | | |")
    lines += ["", "*predicted time*: the additive model's time fraction of the original (layers timed alone); the "
              "measured fraction is 1 / speedup.", ""]
    for block in data["layers"]:
        lines += [f"## Layers of {block['model']} timed alone: {block['runtime']}, batch {block['batch']}", "",
                  "Each factorized layer (k×k conv to r channels, then 1×1; for 1×1 layers two 1×1) as fractions of "
                  "the dense layer: MACs / time (time ÷ MACs above 1 means each MAC removed saves less than its "
                  "share of time). The columns are the sampled ranks nearest to 25%, 50% and 75% of the MACs.", "",
                  "| layer geometry (k×k in→out @input) | layers | dense ms | ~25% MACs: r, time | ~50%: r, time | "
                  "~75%: r, time |", "|---|---|---|---|---|---|"]
        for g in block["geometries"]:
            cells = []
            for want in (0.25, 0.5, 0.75):
                r, d = min(g["ranks"].items(), key=lambda kv: abs(kv[1]["mac_fraction"] - want))
                cells.append(f"r{r}: {100 * d['mac_fraction']:.0f}% MACs, {100 * d['time_fraction']:.0f}% time")
            lines.append(f"| {_geometry_label(g)} | {len(g['layers'])} | {g['dense_ms']:.2f} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (seconds); write to --out, not the docs")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs from --out")
    ap.add_argument("--out", type=Path, default=OUT, help="results JSON (default benchmarks/results/speed_bound.json)")
    ap.add_argument("--runtimes", default=None, help="comma-separated runtimes (default: onnxruntime,eager-cl)")
    ap.add_argument("--budgets", default=None, help="comma-separated MAC fractions (default: 0.5,0.3)")
    args = ap.parse_args()
    if args.docs:
        docs(json.loads(args.out.read_text()))
        return
    from rankslim.bench import fix_heap_thresholds
    cfg = dict(SMOKE if args.smoke else FULL)
    # as in benchmarks/speed.py: every model is timed with the same allocator settings, whatever ran before
    cfg["heap_thresholds_fixed"] = fix_heap_thresholds()
    if args.runtimes:
        cfg["runtimes"] = args.runtimes.split(",")
    if args.budgets:
        cfg["budgets"] = [float(v) for v in args.budgets.split(",")]
    data = run(cfg, args.out)
    if not args.smoke:
        docs(data)
    else:
        docs(data, args.out.with_suffix(".md"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
