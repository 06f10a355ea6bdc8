"""Fine-tuning a compressed model: masks kept, optional distillation, GreBdec's phased schedule.

* Masks: every masked layer (``rankslim.layers.sparse``: a boolean ``mask`` buffer next to ``weight``;
  ``torch.nn.utils.prune``: ``weight_mask`` next to ``weight_orig``) has its masked gradients dropped
  before and its masked weights zeroed after every optimizer step, so neither momentum, weight decay
  nor Adam's moments revive a pruned weight.  ``freeze_zeros=True`` also freezes exact zeros of any
  other Conv/Linear weight (models pruned without masks).
* Distillation (Hinton et al. 2015): ``loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y)``.
* Phased (GreBdec section 6, after Han et al.): phase 1 trains everything but the fully connected
  layers, phase 2 only the fully connected layers, phase 3 all at ``final_lr_factor`` × the LR.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RankslimError
from . import distributed as D
from .loop import evaluate, fit, schedule_factor, training_split


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Knowledge-distillation loss (scalar), logits ``(B, classes)``, labels ``(B,)``.

    ``α · T² · KL(p_t ‖ p_s) + (1 − α) · CE(student, y)`` with ``p = softmax(logits / T)``; the KL is
    summed over classes and averaged over the batch, and ``T²`` keeps its gradient scale independent of
    ``T`` (Hinton et al. 2015).
    """
    T = float(temperature)
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / T, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return alpha * T * T * kl + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


class MaskGuard:
    """The (parameter, keep-mask) pairs of a model, and the two operations that keep masked weights at zero."""

    def __init__(self, model: nn.Module, freeze_zeros: bool = False) -> None:
        self.pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        covered: set[int] = set()
        for name, mod in model.named_modules():
            w, m = getattr(mod, "weight", None), getattr(mod, "mask", None)
            if isinstance(w, nn.Parameter) and isinstance(m, torch.Tensor) and m.shape == w.shape:
                self.pairs.append((f"{name}.weight" if name else "weight", w, m))
                covered.add(id(w))
            w, m = getattr(mod, "weight_orig", None), getattr(mod, "weight_mask", None)
            if isinstance(w, nn.Parameter) and isinstance(m, torch.Tensor) and m.shape == w.shape:
                self.pairs.append((f"{name}.weight_orig" if name else "weight_orig", w, m))
                covered.add(id(w))
        if freeze_zeros:
            for name, mod in model.named_modules():
                w = getattr(mod, "weight", None)
                if isinstance(mod, (nn.Conv2d, nn.Linear)) and isinstance(w, nn.Parameter) and id(w) not in covered:
                    keep = w.detach() != 0
                    if not bool(keep.all()):
                        self.pairs.append((f"{name}.weight", w, keep))

    def __len__(self) -> int:
        return len(self.pairs)

    def hook_grads(self) -> list:
        """Register a gradient hook on each masked parameter multiplying its gradient by the mask.

        The hook fires as soon as backward produces the gradient (under DDP before the all-reduce), so the
        optimizer never sees a gradient on a pruned entry.  Returns the handles (``.remove()`` them).
        """
        return [w.register_hook(lambda g, m=m: g * m.to(g.dtype)) for _, w, m in self.pairs]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked entries of the weights (after the optimizer step)."""
        for _, w, m in self.pairs:
            w.mul_(m.to(w.dtype))


def _is_fc(mod: nn.Module) -> bool:
    """Fully connected: an ``nn.Linear`` or a rankslim layer replacing one (class name contains "Linear")."""
    return isinstance(mod, nn.Linear) or "Linear" in type(mod).__name__


def fc_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to fully connected layers (everything else is "conv")."""
    out: set[str] = set()
    for name, mod in model.named_modules():
        if _is_fc(mod):
            out |= {f"{name}.{n}" if name else n for n, _ in mod.named_parameters()}
    return out


def phase_lengths(epochs: int, phase_epochs: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """Epochs of GreBdec's three phases: ``phase_epochs`` or ``epochs`` split as evenly as possible
    (remainder to phase 3, then phase 1)."""
    if phase_epochs is not None:
        p = tuple(int(v) for v in phase_epochs)
        if len(p) != 3 or min(p) < 0 or sum(p) != epochs:
            raise RankslimError(f"phase_epochs must be three non-negative counts summing to epochs={epochs}, got {phase_epochs}")
        return p  # type: ignore[return-value]
    if epochs < 3:
        raise RankslimError(f"the phased schedule needs at least 3 epochs (one per phase), got {epochs}")
    base = epochs // 3
    rem = epochs - 3 * base
    return base + (rem >= 2), base, base + (rem >= 1)


@dataclass
class FinetuneResult:
    """The fine-tuned ``model`` (still carrying its rankslim plan), held-out validation accuracy before and
    after, per-epoch ``history``, the epoch kept, whether early stopping fired, and the files written."""

    model: nn.Module
    val_acc_before: float | None
    val_acc_after: float | None
    history: list[dict]
    best_epoch: int | None
    stopped_early: bool
    distilled: bool
    masked_layers: int
    files: dict[str, Path] = field(default_factory=dict)


def finetune(
    model: nn.Module,
    data: str | Dataset | DataLoader,
    *,
    teacher: nn.Module | str | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    schedule: str = "cosine",
    val_fraction: float = 0.1,
    patience: int | None = None,
    phased: bool = False,
    phase_epochs: tuple[int, int, int] | None = None,
    final_lr_factor: float = 0.1,
    bn_recalibrate: bool = True,
    calib_samples: int = 512,
    freeze_zeros: bool = False,
    train_samples: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Fine-tune a (compressed) ``model`` on the training split of ``data`` to recover accuracy.

    ``data``: a :mod:`rankslim.data` name (its *train* split), a ``Dataset`` of ``(x, y)`` or a ``DataLoader``;
    ``val_fraction`` of it is held out (seeded) for validation and early stopping (``patience`` epochs
    without a better validation accuracy; the best epoch's weights are kept) — the test split is never read.
    ``teacher`` (an ``nn.Module`` or model spec, usually the original model) turns on distillation with
    ``temperature`` and ``alpha`` (weight of the soft term).  ``phased`` runs GreBdec's three phases
    (``phase_epochs`` or ``epochs`` split in three).  ``bn_recalibrate`` re-estimates BatchNorm statistics on
    ``calib_samples`` training inputs before training.  Masked weights never revive (see module doc).
    ``batch_size`` is the global batch (split across ranks under ``torchrun``).  ``checkpoint_dir``/``resume``:
    see :func:`rankslim.train.loop.fit`.  The user's model is copied unless ``inplace``.
    ``train_samples``: train on a seeded random subset of this many of the (non-held-out) training samples
    (drawn once; every epoch reshuffles the same subset) — a short recovery fine-tune.
    """
    if not 0.0 <= alpha <= 1.0:
        raise RankslimError(f"alpha (weight of the distillation term) must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise RankslimError(f"temperature must be positive, got {temperature}")
    ctx = D.setup(device)
    try:
        work = model if inplace else copy.deepcopy(model)
        work.to(ctx.device)
        train_set, val_set, hint = training_split(data, val_fraction, seed)
        if train_samples is not None:
            if int(train_samples) < 1:
                raise RankslimError(f"train_samples must be a positive number of samples, got {train_samples}")
            if int(train_samples) < len(train_set):
                from torch.utils.data import Subset
                pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + 7919))
                train_set = Subset(train_set, sorted(pick[:int(train_samples)].tolist()))
        if isinstance(data, DataLoader) and hint and batch_size == 128:
            batch_size = hint
        t_model = None
        if teacher is not None:
            if isinstance(teacher, (str, os.PathLike)):
                from ..zoo import resolve_model
                teacher = resolve_model(os.fspath(teacher)).model
            # a private copy: the user's teacher is neither moved nor switched to eval mode
            t_model = copy.deepcopy(teacher).to(ctx.device).eval()
            for p in t_model.parameters():
                p.requires_grad_(False)
        guard = MaskGuard(work, freeze_zeros)
        guard.apply()
        val_before = evaluate(work, val_set, device=ctx.device)[1] if val_set is not None else None
        if bn_recalibrate and not resume:
            from ..bn import recalibrate_bn
            from ..data import calibration_batches
            recalibrate_bn(work, calibration_batches(train_set, calib_samples, seed=seed))

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = m(x)
            if t_model is None:
                return F.cross_entropy(logits, y), logits
            with torch.no_grad():
                t_logits = t_model(x)
            return distillation_loss(logits, t_logits, y, temperature, alpha), logits

        frozen_fn = None
        lr_lambda = None
        early_from = 0
        if phased:
            p1, p2, p3 = phase_lengths(epochs, phase_epochs)
            fc = fc_parameter_names(work)
            conv = {n for n, _ in work.named_parameters()} - fc

            def frozen_fn(e: int) -> Iterable[str]:
                return fc if e < p1 else (conv if e < p1 + p2 else ())

            def lr_lambda(e: int) -> float:
                # each phase runs its own schedule; phase 3 at the small final learning rate
                if e < p1:
                    return schedule_factor(schedule, e, p1)
                if e < p1 + p2:
                    return schedule_factor(schedule, e - p1, p2)
                return final_lr_factor * schedule_factor(schedule, e - p1 - p2, p3)
            early_from = p1 + p2  # only the last phase may stop early

        handles = guard.hook_grads()
        try:
            res = fit(work, train_set, val_set, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                      momentum=momentum, weight_decay=weight_decay, schedule=schedule, lr_lambda=lr_lambda,
                      loss_fn=loss_fn, patience=patience,
                      seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
                      config={"kind": "finetune", "distill": t_model is not None, "temperature": temperature,
                              "alpha": alpha, "phased": phased, "val_fraction": val_fraction,
                              "train_samples": train_samples,
                              "final_lr_factor": final_lr_factor, "freeze_zeros": freeze_zeros},
                      after_step=(lambda step: guard.apply()) if len(guard) else None, frozen=frozen_fn,
                      early_stop_from=early_from, progress=progress, desc="finetune", ctx=ctx)
        finally:
            for h in handles:
                h.remove()
        guard.apply()
        val_after = evaluate(work, val_set, device=ctx.device)[1] if val_set is not None else None
        return FinetuneResult(work, val_before, val_after, res.history, res.best_epoch, res.stopped_early,
                              t_model is not None, len(guard), res.files)
    finally:
        D.teardown(ctx)


__all__ = ["FinetuneResult", "MaskGuard", "distillation_loss", "fc_parameter_names", "finetune", "phase_lengths"]
