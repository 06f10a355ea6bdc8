"""Recovery by fine-tuning: the reference ResNet-20 and LeNet-5 (Fashion-MNIST) at 0.5 / 0.25 / 0.1 of the
parameters with the best data-aware method (zhang), test accuracy right after compression and after a short
fine-tune without and with distillation from the original; and the smallest parameter budget within 1 point
(``compress(max_drop=0.01)``, held-out training data) with and without fine-tuning.

    python benchmarks/recovery.py --quick    # minutes: 1 fine-tune epoch on a 3,000-image subset, 2,000 test images
    python benchmarks/recovery.py            # 2 epochs on 12,000 images (the main job's fine-tune), whole test set
    python benchmarks/recovery.py --docs     # regenerate the markdown from the JSON

Writes benchmarks/results/recovery[.quick].json and docs/results/recovery[.quick].md (atomically).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import rankslim
from rankslim.data import evaluate_accuracy, load_dataset
from rankslim.target import compress_within_drop, finetune_compressed
from rankslim.train.loop import atomic_write_bytes
from rankslim.zoo import resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "results"
MODELS = ("resnet20", "lenet5")
BUDGETS = (0.5, 0.25, 0.1)
METHOD = "zhang"  # the best data-aware method on the reference models (docs/results/*: lowest accuracy loss)


def _paths(quick: bool) -> tuple[Path, Path]:
    stem = "recovery.quick" if quick else "recovery"
    return RESULTS / f"{stem}.json", DOCS / f"{stem}.md"


def run(quick: bool, models: tuple[str, ...], epochs: int | None = None, samples: int | None = None,
        max_evals: int | None = None, tol: float | None = None, save=None) -> dict:
    """Measure every row; returns the JSON-able results (``save(out)`` is called after each row)."""
    epochs_d, samples_d, n_test = (1, 3000, 2000) if quick else (2, 12000, None)
    epochs, samples = epochs or epochs_d, samples or samples_d
    max_evals = max_evals or (6 if quick else 8)
    tol = tol or (0.04 if quick else 0.02)
    ft = {"lr": 0.01, "train_samples": samples, "val_fraction": 0.1}
    test = load_dataset("fashion-mnist", "test")
    out: dict = {"quick": quick, "method": METHOD, "finetune": {"epochs": epochs, **ft, "temperature": 4.0,
                                                                  "alpha": 0.9},
                 "test_samples": n_test or len(test),
                 "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "machine": platform.machine()},
                 "search": {"tol": tol, "max_evals": max_evals}, "rows": [], "max_drop": []}
    for name in models:
        spec = resolve_model(f"zoo:{name}")
        base = evaluate_accuracy(spec.model, test, max_samples=n_test)
        common = dict(input_shape=spec.input_shape, data="fashion-mnist", bn_recalibrate=True, keep_stem=True)
        for frac in BUDGETS:
            t0 = time.perf_counter()
            row = {"model": name, "params": frac, "original": base}
            try:
                res = rankslim.compress(spec.model, METHOD, params=frac, **common)
            except rankslim.RankslimError as exc:  # a budget below the smallest possible model
                row["error"] = str(exc)
                out["rows"].append(row)
                print(f"{name} params {frac}: {exc}", flush=True)
                continue
            row["measured_params"] = sum(p.numel() for p in res.model.parameters()) / sum(
                p.numel() for p in spec.model.parameters())
            row["compressed"] = evaluate_accuracy(res.model, test, max_samples=n_test)
            for label, distill in (("finetuned_ce", False), ("finetuned_kd", True)):
                again = copy.deepcopy(res)  # the same compressed model, fine-tuned two ways
                info = finetune_compressed(again, spec.model, "fashion-mnist", epochs, {**ft, "distill": distill})
                row[label] = evaluate_accuracy(again.model, test, max_samples=n_test)
                row[f"{label}_seconds"] = info["seconds"]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if save is not None:
                save(out)
        for tuned in (0, epochs):
            t0 = time.perf_counter()
            # compress(max_drop=...) with a coarser bracket in quick runs (every candidate may be fine-tuned)
            res = compress_within_drop(spec.model, spec.input_shape, method=METHOD, max_drop=0.01,
                                       data="fashion-mnist", bn_recalibrate=True, keep_stem=True,
                                       finetune_epochs=tuned, finetune_options={**ft, "val_fraction": 0.0},
                                       tol=tol, max_evals=max_evals)
            info = res.report.metrics["max_drop"]
            entry = {"model": name, "finetune_epochs": tuned, "chosen_params": info["chosen_budget"],
                     "held_out_original": info["original_accuracy"],
                     "held_out_chosen": next(e["accuracy"] for e in res.report.metrics["max_drop_search"]
                                             if e["budget"] == info["chosen_budget"]),
                     "test_original": base, "test_chosen": evaluate_accuracy(res.model, test, max_samples=n_test),
                     "evaluations": info["evaluations"], "search": res.report.metrics["max_drop_search"],
                     "seconds": round(time.perf_counter() - t0, 1)}
            out["max_drop"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "search"}), flush=True)
            if save is not None:
                save(out)
    return out


def write_docs(data: dict, quick: bool) -> str:
    """The markdown table of ``data`` (written to docs/results/recovery[.quick].md); returns it."""
    f = data["finetune"]
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Recovery by fine-tuning ({'QUICK smoke run — not the full protocol' if quick else 'full run'})", "",
             f"Generated by `python benchmarks/recovery.py{' --quick' if quick else ''}` "
             "(edit the script, not this file).", "",
             f"Method `{data['method']}` (data-aware, 256 calibration images, sequential), stem conv and output head "
             "dense, BatchNorm re-estimated; budgets are fractions of the parameters. Fine-tune: "
             f"{f['epochs']} epoch(s) of SGD (momentum 0.9, lr {f['lr']}, cosine) on a seeded subset of "
             f"{f['train_samples']:,} Fashion-MNIST training images (10 % of the training split held out); "
             f"distillation: T = {f['temperature']}, α = {f['alpha']} from the original model. Test accuracy on "
             f"{data['test_samples']:,} test images (%). A fine-tune that lowers the held-out accuracy is undone (the "
             "compressed model is kept), so a fine-tuned figure equal to the compressed one means no gain was found.",
             "",
             "| model | params | measured params | original | compressed | fine-tuned (CE) | fine-tuned (KD) | "
             "KD: points below original |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params']} | impossible: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params']} | {r['measured_params']:.3f} | {pct(r['original'])} | "
                     f"{pct(r['compressed'])} | {pct(r['finetuned_ce'])} | {pct(r['finetuned_kd'])} | "
                     f"{100 * (r['original'] - r['finetuned_kd']):+.2f} |")
    lines += ["", "## Smallest parameter budget within 1 point", "",
              "`compress(max_drop=0.01)`: bisection on the params fraction, accuracy judged on 10 % of the TRAINING "
              "split held out (the test split never chooses); with fine-tuning every candidate is fine-tuned. Bracket "
              f"{data.get('search', {}).get('tol', 0.04 if quick else 0.01)}, at most "
              f"{data.get('search', {}).get('max_evals', 6 if quick else 10)} candidates.", "",
              "| model | fine-tune epochs | chosen params | held-out original | held-out chosen | test original | "
              "test chosen | candidates | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for e in data["max_drop"]:
        lines.append(f"| {e['model']} | {e['finetune_epochs']} | {e['chosen_params']:.3f} | "
                     f"{pct(e['held_out_original'])} | {pct(e['held_out_chosen'])} | {pct(e['test_original'])} | "
                     f"{pct(e['test_chosen'])} | {e['evaluations']} | {e['seconds']} |")
    lines += ["", f"Environment: torch {data['env']['torch']}, {data['env']['threads']} thread(s), "
              f"{data['env']['machine']}."]
    if quick:
        lines += ["", "QUICK: one short epoch on a small subset and a partial test set, on a shared CPU — the figures "
                  "show the pipeline works and the direction of the effects, not the recoverable accuracy."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (writes *.quick.json / *.quick.md)")
    ap.add_argument("--docs", action="store_true", help="only regenerate the markdown from the JSON")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo models")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default 2; 1 with --quick)")
    ap.add_argument("--samples", type=int, default=None, help="fine-tune training images (default 12,000)")
    ap.add_argument("--max-evals", type=int, default=None, help="max_drop candidates (default 8; 6 with --quick)")
    ap.add_argument("--tol", type=float, default=None, help="max_drop bracket (default 0.02; 0.04 with --quick)")
    args = ap.parse_args()
    js, md = _paths(args.quick)
    if args.docs:
        data = json.loads(js.read_text())
    else:
        js.parent.mkdir(parents=True, exist_ok=True)

        def save(out: dict) -> None:
            atomic_write_bytes(js, (json.dumps(out, indent=1) + "\n").encode())
        data = run(args.quick, tuple(m for m in args.models.split(",") if m), args.epochs, args.samples,
                   args.max_evals, args.tol, save)
        save(data)
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(md, write_docs(data, args.quick).encode())
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
