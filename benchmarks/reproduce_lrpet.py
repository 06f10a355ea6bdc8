"""Reproduce LRPET's ablations on Fashion-MNIST with the reference ResNet-20 (short, documented schedule).

Table VII analogue: Low-Rank Projection / w/o BN rectification / w/o energy transfer / LRPET.
Table VIII analogue: factorized from scratch / factorized fine-tuning of the trained zoo model / early stop &
ordinary training / LRPET.  Table IX analogue: seconds per epoch of plain SGD, LRPET and TRP in one run, as ratios.
Every row: mean ± std over seeds of the compact model's test accuracy.

    python benchmarks/reproduce_lrpet.py --quick          # minutes: 1 seed, 1 epoch, 6,000-image subset
    python benchmarks/reproduce_lrpet.py                  # 3 seeds, 15 epochs each (hours on 2 CPU cores)

Results go to benchmarks/results/lrpet.json and .md (written atomically).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from rankslim.data import load_dataset
from rankslim.train import fit, train_lrpet, train_trp
from rankslim.train.loop import atomic_write_bytes, training_split
from rankslim.zoo import get_zoo_model, resnet20

RESULTS = Path(__file__).resolve().parent / "results"


def _mean_std(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0.0):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, a 6,000-image training subset")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--rank-ratio", type=float, default=0.6)
    ap.add_argument("--subset", type=int, default=None,
                    help="train on the first N training images (a short schedule; results go to lrpet_subsetN.*)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 1 if args.quick else args.epochs
    train = load_dataset("fashion-mnist", "train")
    if args.quick or args.subset:
        train = Subset(train, list(range(args.subset or 6000)))
    test = load_dataset("fashion-mnist", "test")
    P = args.rank_ratio
    rows: dict[str, list[float]] = {}

    def add(name: str, acc: float) -> None:
        rows.setdefault(name, []).append(acc)
        print(f"{name}: {acc:.4f}", flush=True)

    for seed in seeds:
        torch.manual_seed(seed)
        init = resnet20()
        common = dict(rank_ratio=P, epochs=epochs, lr=0.1, seed=seed, test_data=test, keep_stem=True)
        for name, et, bn in (("Low-Rank Projection", False, False), ("LRPET (w/o BN rectification)", True, False),
                             ("LRPET (w/o energy transfer)", False, True), ("LRPET", True, True)):
            add(f"VII {name}", train_lrpet(init, train, energy_transfer=et, bn_rectify=bn, **common).compact_test_acc)
        add("VIII From Scratch", train_lrpet(init, train, strategy="factorized", **common).compact_test_acc)
        ft = dict(common, lr=0.001)
        add("VIII Fine Tuning", train_lrpet(get_zoo_model("resnet20"), train, strategy="factorized",
                                            **ft).compact_test_acc)
        add("VIII Early Stop & Ordinary Training",
            train_lrpet(init, train, strategy="early-stop", **common).compact_test_acc)
        add("VIII LRPET", rows["VII LRPET"][-1])

    # Table IX: time per epoch, one run each, same data and model
    times = {}
    tr, va, _ = training_split(train, 0.1, 0)
    t0 = time.perf_counter()
    fit(resnet20(), tr, va, epochs=1, lr=0.1, weight_decay=5e-4, schedule="constant")
    times["SGD"] = time.perf_counter() - t0
    for name, fn in (("LRPET", lambda: train_lrpet(resnet20(), train, rank_ratio=P, epochs=1)),
                     ("TRP", lambda: train_trp(resnet20(), train, rank_ratio=P, epochs=1)),
                     ("TRP+Nu", lambda: train_trp(resnet20(), train, rank_ratio=P, epochs=1, nuclear_weight=1e-4))):
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0
    out = {"settings": {"quick": args.quick, "subset": args.subset or (6000 if args.quick else None), "seeds": seeds, "epochs": epochs, "rank_ratio": P, "lr": 0.1,
                        "schedule": "step", "batch_size": 128, "weight_decay": 5e-4},
           "accuracy": {k: {"mean": statistics.mean(v), "values": v} for k, v in rows.items()},
           "seconds_per_epoch": times, "ratio_to_sgd": {k: v / times["SGD"] for k, v in times.items()}}
    RESULTS.mkdir(exist_ok=True)
    stem = "lrpet_quick" if args.quick else (f"lrpet_subset{args.subset}_e{epochs}" if args.subset else "lrpet")
    atomic_write_bytes(RESULTS / f"{stem}.json", json.dumps(out, indent=2).encode())
    md = ["| row | test accuracy (%) |", "|---|---|"] + [f"| {k} | {_mean_std(v)} |" for k, v in rows.items()]
    md += ["", "| method | s / epoch | × SGD |", "|---|---|---|"]
    md += [f"| {k} | {v:.1f} | {out['ratio_to_sgd'][k]:.2f} |" for k, v in times.items()]
    atomic_write_bytes(RESULTS / f"{stem}.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
