"""TRP baseline (Xu et al., "Trained Rank Pruning", IJCAI 2019), as the LRPET paper compares against it.

Low-rank projection after EVERY iteration (``T = 1``), plain truncation (no energy transfer, no BN
rectification), optionally with a nuclear-norm regularizer ``λ Σ_l ‖W_l‖_*`` on the projected layers (TRP+Nu),
whose gradient ``λ U Vᵀ`` autograd obtains from an SVD of every layer at every iteration.  The rank of each
layer follows the same ``⌊(1 − P)·min(m, n)⌋`` rule as LRPET (the TRP paper picks ranks by an energy
threshold; a fixed ratio keeps the comparison at equal cost).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch.utils.data import DataLoader, Dataset
from torch import nn

from .lrpet import LRPETResult, ProjectionTarget, train_projected


def nuclear_norm(targets: list[ProjectionTarget]) -> torch.Tensor:
    """``Σ_l ‖W_l‖_*`` over the targets' (im2col) weight matrices: a differentiable scalar."""
    total = None
    for t in targets:
        w = t.module.weight
        v = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord="nuc")
        total = v if total is None else total + v
    return total if total is not None else torch.zeros(())


def train_trp(
    model: nn.Module,
    data: str | Dataset | DataLoader,
    *,
    rank_ratio: float = 0.5,
    nuclear_weight: float = 0.0,
    period: int = 1,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    schedule: str = "step",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    keep_stem: bool = False,
    keep_head: bool = True,
    min_params: int = 0,
    val_fraction: float = 0.1,
    test_data: str | Dataset | DataLoader | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int = 0,
    inplace: bool = False,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> LRPETResult:
    """Train ``model`` with TRP: projection onto rank ``⌊(1 − P)·min(m, n)⌋`` every ``period`` (default 1)
    iterations, plus ``nuclear_weight · Σ‖W‖_*`` in the loss when ``nuclear_weight > 0``.  Returns the same
    :class:`~rankslim.train.lrpet.LRPETResult` as :func:`~rankslim.train.lrpet.train_lrpet` (compact model,
    projected model, both accuracies).  Other arguments as in ``train_lrpet``.
    """
    reg = None
    if nuclear_weight > 0:
        lam = float(nuclear_weight)

        def reg(targets: list[ProjectionTarget]) -> torch.Tensor:
            return lam * nuclear_norm(targets)
    return train_projected(model, data, kind="trp", rank_ratio=rank_ratio, period=period, energy_transfer=False,
                           bn_rectify=False, eps=1e-5, epochs=epochs, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, batch_size=batch_size, schedule=schedule, regularizer=reg,
                           include=include, exclude=exclude, keep_stem=keep_stem, keep_head=keep_head, min_params=min_params,
                           val_fraction=val_fraction, test_data=test_data, checkpoint_dir=checkpoint_dir,
                           resume=resume, seed=seed, inplace=inplace, progress=progress, device=device,
                           extra_config={"nuclear_weight": nuclear_weight})


__all__ = ["nuclear_norm", "train_trp"]
