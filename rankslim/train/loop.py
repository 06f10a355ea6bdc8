"""The one training loop every trainer shares: epochs, SGD/Adam, LR schedule, early stopping,
atomic checkpoints with exact resume, CSV metrics, a PNG of the curves, a rich progress bar, and DDP.

Determinism: the training order of epoch ``e`` is ``DistributedSampler(seed=seed).set_epoch(e)``'s
permutation and the torch RNG is reseeded from ``(seed, e, rank)`` at the start of every epoch, so an
interrupted run resumed from its last checkpoint replays exactly what the uninterrupted run would have
done (bit-identical on CPU).  Under DDP with ``W`` processes each rank reads ``batch_size / W`` samples
of every global batch (the sampler interleaves the same permutation), so the averaged gradient is the
gradient of the same global batch a 1-process run sees.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ..errors import CheckpointError, DataError, RankslimError
from . import distributed as D

#: checkpoint format tag; a file without it is not a rankslim training checkpoint
CHECKPOINT_FORMAT = "rankslim-train-1"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"

SCHEDULES = ("cosine", "step", "constant")

#: ``loss_fn(model, x, y) -> (loss, logits)``
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain mean cross-entropy of ``model(x)`` (logits ``(B, classes)``) against labels ``y: (B,)``."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def schedule_factor(schedule: str, epoch: int, epochs: int) -> float:
    """LR multiplier of 0-based ``epoch`` out of ``epochs``.

    ``cosine``: ``0.5 (1 + cos(pi e / E))``; ``step``: divide by 10 at 50 % and 75 % of the epochs (the
    LRPET paper's CIFAR schedule); ``constant``: 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "step":
        return 0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs))
    raise RankslimError(f"unknown LR schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------------------------- data


def training_split(data: str | Dataset | DataLoader, val_fraction: float, seed: int = 0
                   ) -> tuple[Dataset, Dataset | None, int | None]:
    """``(train, val, batch_size_hint)`` from ``data``, holding out ``val_fraction`` of the TRAINING data.

    ``data``: a dataset name of :mod:`rankslim.data` (its train split; the test split is never read
    here), a map-style ``Dataset`` of ``(x, y)``, or a ``DataLoader`` over one (its dataset and batch size
    are used; the loop does its own seeded shuffling).  The held-out indices are a seeded permutation's
    first ``round(val_fraction * n)`` items; ``val`` is ``None`` when that is 0.
    """
    from ..data import load_dataset

    hint = None
    if isinstance(data, DataLoader):
        hint = data.batch_size
        data = data.dataset
    if isinstance(data, str):
        data = load_dataset(data, "train")
    if isinstance(data, IterableDataset) or not isinstance(data, Dataset):
        raise DataError(f"training needs a dataset name, a map-style Dataset of (x, y) or a DataLoader over one, "
                        f"got {type(data).__name__}")
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise DataError("training needs a dataset with a length (map-style)") from None
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if n - n_val < 1:
        raise DataError(f"the training data holds {n} samples: too few to train on")
    if n_val == 0:
        return data, None, hint
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, sorted(perm[n_val:])), Subset(data, sorted(perm[:n_val])), hint


def sample_inputs(dataset: Dataset, n: int = 8) -> torch.Tensor:
    """The first ``n`` inputs of ``dataset`` stacked into one batch ``(n, *input_shape)``."""
    xs = []
    for i in range(min(n, len(dataset))):  # type: ignore[arg-type]
        item = dataset[i]
        xs.append(item[0] if isinstance(item, (tuple, list)) else item)
    if not xs:
        raise DataError("the training data is empty")
    return torch.stack([torch.as_tensor(x) for x in xs])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: torch.device | None = None
             ) -> tuple[float, float]:
    """``(mean cross-entropy, top-1 accuracy in [0, 1])`` of ``model`` on ``dataset`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    device = device or _device_of(model)
    was = model.training
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was)
    if total == 0:
        raise DataError("cannot evaluate on empty data")
    return loss_sum / total, correct / total


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------ files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Write ``rows`` (one dict per epoch) as CSV, columns in first-seen order, atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_curves(rows: list[dict], path: Path, title: str = "training") -> Path:
    """PNG of loss (left) and accuracy (right) per epoch for train and validation, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax in (("loss", a1), ("acc", a2)):
        for split in ("train", "val"):
            ys = [r.get(f"{split}_{key}") for r in rows]
            if any(v is not None for v in ys):
                ax.plot(ep, [float("nan") if v is None else v for v in ys], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy" if key == "loss" else "top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------- loop


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch ``history`` (dicts: epoch, lr, train/val loss and accuracy,
    seconds, and whatever ``epoch_metrics`` adds), the epoch whose weights were kept (``best_epoch``,
    1-based; ``None`` without validation), whether early stopping fired, how many epochs ran in this
    call, the epoch a resume started from, and the files written."""

    model: nn.Module
    history: list[dict]
    best_epoch: int | None
    stopped_early: bool
    epochs_run: int
    resumed_from: int | None
    files: dict[str, Path] = field(default_factory=dict)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


def _config_diff(saved: Mapping, now: Mapping) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint (tensors and plain data only: ``weights_only=True``)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable training checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a rankslim training checkpoint")
    return ck


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    lr_lambda: Callable[[int], float] | None = None,
    loss_fn: LossFn | None = None,
    patience: int | None = None,
    restore_best: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_name: str = CHECKPOINT_NAME,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    after_step: Callable[[int], None] | None = None,
    frozen: Callable[[int], Iterable[str]] | None = None,
    early_stop_from: int = 0,
    epoch_metrics: Callable[[int], Mapping[str, Any]] | None = None,
    extra_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    epoch_offset: int = 0,
    prior_history: list[dict] | None = None,
    progress: bool = False,
    desc: str = "training",
    ctx: D.DistContext | None = None,
) -> FitResult:
    """Train ``model`` in place on ``train_set`` for ``epochs`` epochs; validate on ``val_set`` after each.

    * optimizer ``"sgd"`` (``momentum``, ``weight_decay``) or ``"adam"``; base learning rate ``lr`` times
      ``lr_lambda(epoch)`` if given, else :func:`schedule_factor` (``schedule`` over ``epochs``).
      ``epoch`` seen by ``lr_lambda``, ``frozen`` and ``epoch_metrics`` is ``epoch_offset + e`` (0-based).
    * ``batch_size`` is the GLOBAL batch; under DDP (``ctx.world_size = W``) each rank reads ``batch_size / W``.
    * ``loss_fn(model, x, y) -> (loss, logits)``, default cross-entropy; ``after_step(step)`` runs after every
      optimizer step (``step``: 1-based count within this fit) — projection and mask re-application live there.
    * ``frozen(epoch)`` names parameters not updated that epoch (their gradients are dropped, so neither the
      update, momentum nor weight decay touches them).
    * early stopping: with ``val_set`` and ``patience``, stop after ``patience`` epochs (counted from epoch
      ``early_stop_from``) without a better validation accuracy; with ``restore_best`` the best epoch's
      weights are loaded back at the end.
    * ``checkpoint_dir``: after every epoch ``checkpoint_name`` (model, optimizer, scheduler, RNG states, epoch,
      history, best weights, ``extra_state[0]()``) is written atomically, with ``metrics.csv``; ``curves.png`` at
      the end.  ``resume=True`` continues from that checkpoint (``config`` must match the saved one); without
      ``resume`` an existing checkpoint is refused rather than overwritten.
    """
    ctx = ctx or D.DistContext(device=_device_of(model))
    if epochs < 1:
        raise RankslimError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0:
        raise RankslimError(f"the learning rate must be positive, got {lr}")
    if batch_size < 1 or batch_size % ctx.world_size:
        raise RankslimError(f"the global batch size {batch_size} must be a positive multiple of the number of "
                            f"processes ({ctx.world_size})")
    if schedule not in SCHEDULES:
        raise RankslimError(f"unknown LR schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    loss_fn = loss_fn or cross_entropy_loss
    config = dict(config or {})
    config.update(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                  weight_decay=weight_decay, schedule=schedule, patience=patience, seed=seed,
                  world_size=ctx.world_size)
    ckpt_path = None
    files: dict[str, Path] = {}
    if checkpoint_dir is not None:
        cdir = Path(checkpoint_dir)
        if ctx.is_main:
            cdir.mkdir(parents=True, exist_ok=True)
        ckpt_path = cdir / checkpoint_name
        files = {"checkpoint": ckpt_path, "metrics": cdir / METRICS_NAME, "curves": cdir / CURVES_NAME}
        if ckpt_path.exists() and not resume:
            raise CheckpointError(f"{ckpt_path} already exists from an earlier run; pass resume=True (--resume) to "
                                  "continue it, or choose another directory")
    elif resume:
        raise CheckpointError("resume needs a checkpoint directory (checkpoint_dir / --out)")

    model.to(ctx.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise RankslimError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    factor = lr_lambda or (lambda e: schedule_factor(schedule, e, epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: factor(epoch_offset + e))

    history: list[dict] = []
    best = {"score": -math.inf, "epoch": None, "state": None}
    bad_epochs, start, stopped, resumed_from = 0, 0, False, None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        diff = _config_diff(ck.get("config", {}), config)
        if diff:
            raise CheckpointError(f"{ckpt_path} was written by a run with other settings ({'; '.join(diff)}); resume "
                                  "with the same settings or start in another directory")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        history = list(ck["history"])
        best = dict(ck["best"])
        bad_epochs, start, stopped = int(ck["bad_epochs"]), int(ck["epoch"]), bool(ck["stopped"])
        if extra_state is not None:
            extra_state[1](ck.get("extra"))
        resumed_from = start

    train_model: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=batch_size // ctx.world_size, sampler=sampler)
    steps_per_epoch = len(loader)
    name_of = {id(p): n for n, p in named}

    bar = task = None
    if progress and ctx.is_main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), transient=False)
        bar.start()
        task = bar.add_task(desc, total=(epochs - start) * steps_per_epoch, info="")

    epochs_run = 0
    try:
        for e in range(start, epochs):
            if stopped:
                break
            abs_epoch = epoch_offset + e
            t0 = time.perf_counter()
            torch.manual_seed(seed * 1_000_003 + abs_epoch * 1009 + ctx.rank)
            sampler.set_epoch(abs_epoch)
            frozen_names = set(frozen(abs_epoch)) if frozen else set()
            model.train()
            loss_sum = correct = seen = 0.0
            for i, (x, y) in enumerate(loader):
                x, y = x.to(ctx.device), y.to(ctx.device)
                loss, logits = loss_fn(train_model, x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if frozen_names:
                    for p in params:
                        if name_of[id(p)] in frozen_names:
                            p.grad = None
                opt.step()
                if after_step is not None:
                    after_step(e * steps_per_epoch + i + 1)
                b = int(y.numel())
                loss_sum += float(loss.detach()) * b
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += b
                if bar is not None:
                    bar.update(task, advance=1, info=f"epoch {abs_epoch + 1} loss {loss_sum / max(seen, 1):.4f} "
                                                     f"acc {correct / max(seen, 1):.3f}")
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            D.sync_buffers(ctx, model)
            loss_sum, correct, seen = D.all_reduce_sum(ctx, [loss_sum, correct, seen])
            row: dict[str, Any] = {"epoch": abs_epoch + 1, "lr": lr_now, "train_loss": loss_sum / max(seen, 1),
                                   "train_acc": correct / max(seen, 1), "val_loss": None, "val_acc": None}
            if val_set is not None:
                row["val_loss"], row["val_acc"] = evaluate(model, val_set, device=ctx.device)
            if epoch_metrics is not None:
                row.update(epoch_metrics(abs_epoch))
            row["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(row)
            epochs_run += 1
            if val_set is not None:
                if row["val_acc"] > best["score"]:
                    best = {"score": row["val_acc"], "epoch": abs_epoch + 1,
                            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                            if restore_best else None}
                    bad_epochs = 0
                elif e >= early_stop_from:
                    bad_epochs += 1
                if patience is not None and bad_epochs >= patience:
                    stopped = True
            if bar is not None:
                bar.console.print(f"{desc} epoch {abs_epoch + 1}/{epoch_offset + epochs}: lr {lr_now:.3g}  "
                                  f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                                  + (f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                                     if row["val_acc"] is not None else ""))
            if ckpt_path is not None and ctx.is_main:
                atomic_torch_save({
                    "format": CHECKPOINT_FORMAT, "epoch": e + 1, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                    "history": history, "best": best, "bad_epochs": bad_epochs, "stopped": stopped,
                    "extra": extra_state[0]() if extra_state is not None else None, "config": config,
                }, ckpt_path)
                write_metrics_csv(list(prior_history or []) + history, files["metrics"])
            D.barrier(ctx)
    finally:
        if bar is not None:
            bar.stop()
    if restore_best and best.get("state") is not None:
        model.load_state_dict(best["state"])
    if ckpt_path is not None and ctx.is_main:
        rows = list(prior_history or []) + history
        if rows:
            write_metrics_csv(rows, files["metrics"])
            plot_curves(rows, files["curves"], desc)
    D.barrier(ctx)
    return FitResult(model, history, best.get("epoch"), stopped, epochs_run, resumed_from, files)


__all__ = ["FitResult", "SCHEDULES", "cross_entropy_loss", "schedule_factor", "training_split", "sample_inputs",
           "evaluate", "fit", "load_checkpoint", "atomic_torch_save", "atomic_write_bytes", "write_metrics_csv",
           "plot_curves", "CHECKPOINT_NAME", "METRICS_NAME", "CURVES_NAME"]
