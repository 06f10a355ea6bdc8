"""Train the reference models of rankslim's zoo (LeNet-5, ResNet-20, ViT) on Fashion-MNIST, seeded and on CPU.

    python scripts/train_reference.py                    # all models, defaults: ~12 min on 2 idle cores
    python scripts/train_reference.py --model lenet5 --epochs 10 --seed 0 --out rankslim/checkpoints
    python scripts/train_reference.py --docs             # only rewrite docs/reference-models.md from the JSON logs

Writes ``NAME.safetensors`` (the float32 state_dict, tensors only) and ``NAME.json`` (settings, a
per-epoch log, the final accuracy on the 10,000 test images, versions) into ``--out``. When
``--out`` is the package's checkpoint folder, docs/reference-models.md is regenerated from the
JSON files afterwards, so the documented numbers are always the recorded ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from rankslim.data import DATASETS, evaluate_accuracy, load_dataset  # noqa: E402
from rankslim.zoo import CHECKPOINT_DIR, ZOO  # noqa: E402

DOC = ROOT / "docs" / "reference-models.md"

#: per-model defaults, chosen so that both models train in < 10 min on 2 CPU cores
DEFAULTS: dict[str, dict] = {
    # LeNet-5 costs ~5 s per epoch: it can afford more epochs; no augmentation (small model underfits)
    "lenet5": {"epochs": 10, "max_lr": 0.05, "crop_padding": 0},
    # ResNet-20 costs ~100 s per epoch on 2 cores (channels-last): 3 epochs with one-cycle is enough for ~91%
    "resnet20": {"epochs": 3, "max_lr": 0.15, "crop_padding": 2},
    # the ViT (16 tokens of 7x7 patches, dim 64) costs ~30-60 s per epoch; transformers train poorly with SGD,
    # so AdamW with decoupled weight decay, as in the ViT papers
    # batch 256 halves the per-step overhead that dominates such small matrices on a shared CPU
    "vit": {"epochs": 6, "max_lr": 0.003, "crop_padding": 0, "optimizer": "AdamW", "weight_decay": 0.05,
            "momentum": None, "nesterov": None, "betas": [0.9, 0.999], "batch_size": 256},
}
COMMON = {"dataset": "fashion-mnist", "batch_size": 128, "optimizer": "SGD", "momentum": 0.9, "nesterov": True,
          "weight_decay": 5e-4, "schedule": "OneCycleLR (cosine annealing, 30% warm-up, div_factor 25)",
          "loss": "cross-entropy"}


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Random-crop every image of ``x`` (N, C, H, W) from its ``padding``-padded version (pad value
    ``fill``, the normalised background); one gather for the whole batch instead of a Python loop."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, value=fill)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]        # (N, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]        # (N, 1, 1, W)
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train_one(name: str, epochs: int, seed: int, out: Path, threads: int) -> dict:
    """Train zoo model ``name``, write NAME.safetensors + NAME.json into ``out``, return the JSON record."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = {**COMMON, **DEFAULTS[name], "epochs": epochs, "seed": seed, "threads": threads}
    info = DATASETS[cfg["dataset"]]
    train, test = load_dataset(cfg["dataset"], "train"), load_dataset(cfg["dataset"], "test")
    x_train, y_train = train.tensors
    model = ZOO[name].constructor()
    # channels-last convolutions are ~30% faster on CPU for these small widths
    model = model.to(memory_format=torch.channels_last)
    if cfg["optimizer"] == "AdamW":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["max_lr"],
                                                       betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg["max_lr"], momentum=cfg["momentum"],
                              nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    steps = math.ceil(len(x_train) / cfg["batch_size"])
    # AdamW has no momentum to cycle; SGD's momentum is cycled as OneCycleLR's default
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["max_lr"], epochs=epochs, steps_per_epoch=steps,
                                                pct_start=0.3, anneal_strategy="cos", div_factor=25.0,
                                                cycle_momentum=cfg["optimizer"] != "AdamW")
    gen = torch.Generator().manual_seed(seed)
    fill = (0.0 - info.mean) / info.std  # a black pixel after normalisation
    log: list[dict] = []
    t_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(steps):
            idx = perm[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            x = random_crop(x_train[idx], cfg["crop_padding"], gen, fill).contiguous(
                memory_format=torch.channels_last)
            y = y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        train_s = time.perf_counter() - t0
        test_acc = evaluate_accuracy(model, test, batch_size=500)
        log.append({"epoch": epoch, "train_loss": round(loss_sum / seen, 5), "train_accuracy": round(correct / seen, 5),
                    "test_accuracy": round(test_acc, 5), "seconds": round(train_s, 1),
                    "lr_end": float(sched.get_last_lr()[0])})
        print(f"[{name}] epoch {epoch}/{epochs}: loss {loss_sum / seen:.4f}, train acc {correct / seen:.4f}, "
              f"test acc {test_acc:.4f}, {train_s:.1f} s", flush=True)
    total_s = time.perf_counter() - t_start

    model = model.to(memory_format=torch.contiguous_format).eval()
    state = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / ZOO[name].checkpoint
    tmp = ckpt.with_name(ckpt.name + ".tmp")  # write then rename: never a half-written checkpoint
    save_file(state, str(tmp), metadata={"model": name, "dataset": cfg["dataset"], "seed": str(seed)})
    os.replace(tmp, ckpt)
    ckpt.chmod(0o644)  # safetensors creates the file owner-only; package data must be world-readable
    record = {
        "model": name,
        "dataset": cfg["dataset"],
        "input_shape": list(ZOO[name].input_shape),
        "params": sum(p.numel() for p in model.parameters()),
        "settings": cfg,
        "augmentation": f"random 28x28 crop of the image padded with black by {cfg['crop_padding']} px on each side" if cfg["crop_padding"] else "none",
        "command": f"python scripts/train_reference.py --model {name} --epochs {epochs} --seed {seed}"
                   + (f" --threads {threads}" if threads != 2 else ""),
        "log": log,
        "final_test_accuracy": log[-1]["test_accuracy"],
        "test_samples": len(test),
        "train_seconds": round(total_s, 1),
        "checkpoint": ckpt.name,
        "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "checkpoint_bytes": ckpt.stat().st_size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {threads} threads",
    }
    js = out / f"{name}.json"
    js.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{name}] test accuracy {record['final_test_accuracy']:.4f} after {total_s:.0f} s -> {ckpt}", flush=True)
    return record


ARCHITECTURES = """\
## Architectures

All three take a single-channel 28×28 image normalised with the Fashion-MNIST constants of `rankslim.data.DATASETS`
(`(pixel/255 − 0.2860) / 0.3530`) and return 10 logits.

**`zoo:lenet5`** — the classic LeNet-5 (as used by the DDLR paper), `rankslim.zoo.lenet5()`:

| module | layer | output |
|---|---|---|
| `conv1` | Conv2d 1→6, 5×5, padding 2, ReLU, max-pool 2 | 6×14×14 |
| `conv2` | Conv2d 6→16, 5×5, ReLU, max-pool 2 | 16×5×5 |
| `fc1` | Linear 400→120, ReLU | 120 |
| `fc2` | Linear 120→84, ReLU | 84 |
| `fc3` | Linear 84→10 | 10 |

**`zoo:resnet20`** — CIFAR-style ResNet-20 (He et al. 2016) with batch norm, `rankslim.zoo.resnet20()`:
stem `conv1` (3×3, 1→16, no bias) + `bn1` + ReLU; three stages `layer1`, `layer2`, `layer3` of three basic blocks
each (two 3×3 conv + BN, widths 16 / 32 / 64, the first block of stages 2 and 3 has stride 2); when the shape
changes the shortcut is a 1×1 conv + BN ("option B"), otherwise the identity; global average pooling; `fc` 64→10.
Feature maps are 28×28 → 14×14 → 7×7.

**`zoo:vit`** — a small Vision Transformer, `rankslim.zoo.vit()`: `patch` Conv2d 1→64, 7×7, stride 7 (16 patch
tokens) + a learned class token and position embeddings (17 tokens of width 64); `blocks` = 4 pre-norm encoder
blocks (`rankslim.zoo.ViTBlock`: LayerNorm → self-attention with 4 heads from separate `q`, `k`, `v` Linears
64→64 and an output `proj` 64→64 → residual; LayerNorm → `fc1` 64→128 → GELU → `fc2` 128→64 → residual);
final LayerNorm `norm`; `head` Linear 64→10 on the class token. Every matrix is a plain `nn.Linear`, so every
one of them can be factorized (no packed `in_proj_weight`). Trained with AdamW (transformers train poorly with
plain SGD), batch 256, one thread.
"""


def write_docs(ckpt_dir: Path = CHECKPOINT_DIR, doc: Path = DOC) -> str:
    """Render docs/reference-models.md from the NAME.json records in ``ckpt_dir`` and write it to ``doc``."""
    records = []
    for name in ZOO:
        js = ckpt_dir / f"{name}.json"
        if js.is_file():
            records.append(json.loads(js.read_text()))
    lines = ["# Reference models", "",
             "rankslim ships three small models trained on Fashion-MNIST (two CNNs and a Vision Transformer), with "
             "their weights in `rankslim/checkpoints/NAME.safetensors` (tensors only, loaded with `safetensors`, "
             "never unpickled) and how they were made in `NAME.json`. Use them as `zoo:lenet5` / `zoo:resnet20` / "
             "`zoo:vit`, or in Python "
             "with `rankslim.zoo.get_zoo_model(NAME)`.", "",
             "*This page is generated by `python scripts/train_reference.py --docs` from the JSON records; "
             "do not edit it by hand.*", "", ARCHITECTURES,
             "## Recorded test accuracy", "",
             "Top-1 accuracy on all 10,000 Fashion-MNIST test images after the last epoch, as recorded in `NAME.json`. "
             "Training time is the wall time recorded on the machine that trained them; it grows when other jobs "
             "share the cores (see the per-epoch seconds below).",
             "", "| model | params | epochs | test accuracy | training time | checkpoint | torch |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| `zoo:{r['model']}` | {r['params']:,} | {r['settings']['epochs']} | "
                     f"{100 * r['final_test_accuracy']:.2f}% | {r['train_seconds']:.0f} s ({r['machine']}) | "
                     f"{r['checkpoint_bytes'] / 1024:.0f} KiB | {r['torch']} |")
    if not records:
        lines.append("| (no records yet: run `python scripts/train_reference.py`) | | | | | | |")
    lines += ["", "## How they were trained", "",
              "```bash", "python scripts/train_reference.py --model all --seed 0 --out rankslim/checkpoints", "```", "",
              "Fashion-MNIST training split (60,000 images, from the Debian package `dataset-fashion-mnist`), "
              "evaluated on the 10,000-image test split; CPU only, `torch.set_num_threads(threads)` (see the table), seeded "
              "(`torch.manual_seed`, and one `torch.Generator` for shuffling and augmentation); re-runs with another "
              "torch version or thread count may differ in the last digits.", ""]
    if records:
        keys = ["dataset", "batch_size", "optimizer", "momentum", "nesterov", "weight_decay", "schedule", "max_lr",
                "epochs", "seed", "threads"]
        keys += [k for k in ("betas",) if any(k in r["settings"] for r in records)]
        lines += ["| setting | " + " | ".join(f"`{r['model']}`" for r in records) + " |",
                  "|---|" + "---|" * len(records)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(str(r["settings"].get(k, "")) for r in records) + " |")
        lines.append("| augmentation | " + " | ".join(r["augmentation"] for r in records) + " |")
        lines += ["", "### Per-epoch log", ""]
        for r in records:
            lines += [f"`{r['model']}` — `{r['command']}`", "",
                      "| epoch | train loss | train accuracy | test accuracy | seconds |", "|---|---|---|---|---|"]
            for e in r["log"]:
                lines.append(f"| {e['epoch']} | {e['train_loss']:.4f} | {100 * e['train_accuracy']:.2f}% | "
                             f"{100 * e['test_accuracy']:.2f}% | {e['seconds']:.0f} |")
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and train (or, with --docs, only regenerate the docs page)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=[*ZOO, "all"])
    ap.add_argument("--epochs", type=int, default=None, help="default: " + ", ".join(
        f"{n} {d['epochs']}" for n, d in DEFAULTS.items()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--docs", action="store_true", help="only regenerate docs/reference-models.md from the JSON")
    args = ap.parse_args(argv)
    if not args.docs:
        names = list(ZOO) if args.model == "all" else [args.model]
        for name in names:
            train_one(name, args.epochs or DEFAULTS[name]["epochs"], args.seed, args.out, args.threads)
        if args.out.resolve() != CHECKPOINT_DIR.resolve():
            print(f"checkpoints written to {args.out}; docs not regenerated (they describe {CHECKPOINT_DIR})")
            return
    write_docs()
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
