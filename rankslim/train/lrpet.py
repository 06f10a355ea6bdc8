"""LRPET: low-rank projection with energy transfer (Guo et al., section III, Algorithm 1).

Plain SGD trains the dense network; every ``T`` iterations each target weight matrix ``W`` (im2col view
``(out, in·kh·kw)`` for convs) is projected onto rank ``r_l = ⌊(1 − P)·min(out, in·kh·kw)⌋``:

* BN rectification (eq. 7): for a conv followed by BatchNorm, work on ``W̃ = Γ Σ⁻¹ W`` (``Γ = diag(γ)``,
  ``Σ = diag(√(running_var + bn.eps))``), the weight the network effectively applies;
* projection (eq. 2): keep the top ``r`` singular triplets of ``W̃ = U S Vᵀ``;
* energy transfer (eq. 6): multiply the kept singular values by ``α = ‖s‖ / ‖s_{1:r}‖`` so ``‖W̃'‖_F = ‖W̃‖_F``;
* back to ``W`` (eq. 10): ``Ŵ = [(ΓΣ⁻¹)ᵀΓΣ⁻¹ + ε]⁻¹ (ΓΣ⁻¹)ᵀ W̃'``, row-wise ``Ŵ_i = d_i / (d_i² + ε) · W̃'_i``
  with ``d = γ / σ`` (``ε = 1e-5``).  Row scaling keeps the rank, so ``Ŵ`` has rank ``≤ r``.

At the end the model is projected one last time and converted to compact factorized layers with
``rankslim.compress(..., method="svd", ranks=...)``; the compact model computes the same function
(up to float rounding), and both accuracies are reported.

Ablations: ``energy_transfer=False`` / ``bn_rectify=False`` (Table VII; both off = "Low-Rank Projection").
``strategy`` gives Table VIII's training strategies: ``"lrpet"`` (default), ``"factorized"`` (decompose
first, then train the compact network: "From Scratch" on a random model, "Fine Tuning" on a trained one),
``"early-stop"`` (LRPET until ``switch_epoch``, then decompose and train the compact network ordinarily with
the same learning-rate schedule: "Early Stop & Ordinary Training").
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import RankError, RankslimError
from . import distributed as D
from .loop import evaluate, fit, sample_inputs, schedule_factor, training_split

STRATEGIES = ("lrpet", "factorized", "early-stop")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def lrpet_rank(shape: tuple[int, int], rank_ratio: float) -> int:
    """``r = ⌊(1 − P) · min(m, n)⌋`` (at least 1) for a matrix of ``shape = (m, n)`` and pruning ratio ``P``."""
    if not 0.0 <= rank_ratio < 1.0:
        raise RankError(f"rank_ratio P (the fraction of the rank pruned) must lie in [0, 1), got {rank_ratio}")
    return max(1, int(math.floor((1.0 - rank_ratio) * min(shape) + 1e-9)))


@torch.no_grad()
def project_weight(W: torch.Tensor, rank: int, *, energy_transfer: bool = True, scale: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """One LRPET projection of a weight matrix ``W: (m, n)`` onto rank ``rank`` (Algorithm 1, lines 5-10).

    ``scale``: the BN rectification row scales ``d = γ / √(running_var + bn_eps)`` ``(m,)``, or ``None`` for
    no BatchNorm (then ``Ŵ`` is the (energy-transferred) truncation of ``W`` itself and eq. 10 is skipped).
    Computed in float64, returned in ``W``'s dtype.
    """
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise RankError(f"rank {rank} is impossible for a {m}x{n} matrix")
    W64 = W.detach().to(torch.float64)
    Wt = W64 if scale is None else scale.to(torch.float64)[:, None] * W64
    U, s, Vh = torch.linalg.svd(Wt, full_matrices=False)
    kept = s[:rank]
    if energy_transfer:
        top = torch.linalg.vector_norm(kept)
        if top > 0:
            kept = kept * (torch.linalg.vector_norm(s) / top)
    Wp = (U[:, :rank] * kept) @ Vh[:rank]
    if scale is not None:
        d = scale.to(torch.float64)
        Wp = (d / (d * d + eps))[:, None] * Wp
    return Wp.to(W.dtype)


def conv_bn_pairs(model: nn.Module, sample: torch.Tensor) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for every Conv2d/Linear whose output tensor is fed straight into a
    BatchNorm, found by running ``sample`` through the model in eval mode with hooks (no graph tracing)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    handles = []

    def out_hook(name):
        def hook(mod, inp, out):
            produced[id(out)] = (name, out)
        return hook

    def bn_hook(name):
        def hook(mod, inp):
            hit = produced.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0]:
                pairs.setdefault(hit[0], name)
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(out_hook(name)))
        elif isinstance(mod, _BN):
            handles.append(mod.register_forward_pre_hook(bn_hook(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample.to(next(model.parameters()).device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return pairs


@dataclass
class ProjectionTarget:
    """One projected layer: its ``name``, ``module`` (Conv2d/Linear), LRPET ``rank`` and the BatchNorm that
    follows it (``None`` when there is none or rectification is off)."""

    name: str
    module: nn.Module
    rank: int
    bn: nn.Module | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Matrix view ``(out, in·kh·kw)`` of the weight."""
        w = self.module.weight
        return int(w.shape[0]), int(w[0].numel())


def bn_scale(bn: nn.Module) -> torch.Tensor | None:
    """``d = γ / √(running_var + eps)`` of a BatchNorm ``(C,)``, or ``None`` if it keeps no running statistics."""
    if getattr(bn, "running_var", None) is None:
        return None
    d = 1.0 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        d = d * bn.weight.detach().to(torch.float64)
    return d


class Projector:
    """Projects every target of a model (rank 0 computes, then broadcasts, so all DDP ranks hold the same
    weights); counts projections."""

    def __init__(self, targets: list[ProjectionTarget], *, energy_transfer: bool = True, eps: float = 1e-5,
                 ctx: D.DistContext | None = None) -> None:
        self.targets = targets
        self.energy_transfer = energy_transfer
        self.eps = eps
        self.ctx = ctx or D.DistContext()
        self.count = 0
        self.last_rel_change = 0.0

    @torch.no_grad()
    def project(self) -> None:
        """Replace each target weight by :func:`project_weight` of it (in place)."""
        num = den = 0.0
        if self.ctx.is_main:
            for t in self.targets:
                w = t.module.weight
                W = w.detach().reshape(w.shape[0], -1)
                scale = bn_scale(t.bn) if t.bn is not None else None
                Wp = project_weight(W, t.rank, energy_transfer=self.energy_transfer, scale=scale, eps=self.eps)
                num += float((Wp - W).double().pow(2).sum())
                den += float(W.double().pow(2).sum())
                w.copy_(Wp.reshape(w.shape))
        D.broadcast_tensors(self.ctx, [t.module.weight for t in self.targets])
        self.count += 1
        self.last_rel_change = math.sqrt(num / den) if den > 0 else 0.0


def select_projection_targets(model: nn.Module, input_shape: tuple[int, ...], rank_ratio: float,
                              include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                              min_params: int = 0, keep_stem: bool = False, keep_head: bool = True,
                              bn_rectify: bool = True, sample: torch.Tensor | None = None) -> list[ProjectionTarget]:
    """Conv2d (ungrouped) and Linear layers chosen as :func:`rankslim.surgery.select_targets` chooses
    compression targets (``keep_head``: the output head stays dense, as in :func:`rankslim.compress`), each
    with its LRPET rank and (if ``bn_rectify``) its following BatchNorm."""
    from ..cost import trace_shapes
    from ..surgery import select_targets

    shapes = trace_shapes(model, input_shape)
    targets, _ = select_targets(model, shapes, include, exclude, min_params, keep_stem)
    sample = sample if sample is not None else torch.zeros(2, *input_shape)
    sample = sample.to(next(model.parameters()).device)
    if keep_head and targets:
        from ..pipeline import find_heads
        heads = set(find_heads(model, sample))
        targets = [t for t in targets if t.name not in heads]
    if not targets:
        raise RankslimError("no Conv2d/Linear layer to project (check include/exclude/keep_stem/keep_head)")
    pairs = conv_bn_pairs(model, sample) if bn_rectify else {}
    out = []
    for t in targets:
        bn = model.get_submodule(pairs[t.name]) if t.name in pairs else None
        out.append(ProjectionTarget(t.name, t.module, lrpet_rank(t.matrix_shape, rank_ratio), bn))
    return out


def to_compact(model: nn.Module, ranks: Mapping[str, int], input_shape: tuple[int, ...]) -> tuple[nn.Module, Any]:
    """Factorize each layer of ``ranks`` (``{name: r}``) by SVD into compact low-rank layers, keeping dense the
    layers whose factorization ``r·(m + n)`` would not hold fewer weights than ``m·n``.  Returns
    ``(compact model, rankslim Report)``; ``model`` is not modified."""
    from ..api import compress

    cheaper = {}
    for name, r in ranks.items():
        w = model.get_submodule(name).weight
        m, n = int(w.shape[0]), int(w[0].numel())
        if r * (m + n) < m * n:
            cheaper[name] = int(r)
    if not cheaper:
        raise RankslimError("no projected layer is cheaper in factorized form at this rank ratio; use a larger P")
    device = next(model.parameters()).device
    # compress traces and decomposes on the CPU; the compact model goes back to the model's device
    src = copy.deepcopy(model).cpu() if device.type != "cpu" else model
    res = compress(src, "svd", ranks=cheaper, input_shape=input_shape, include=list(cheaper), keep_head=False)
    return res.model.to(device), res.report


@dataclass
class LRPETResult:
    """What :func:`train_lrpet` / :func:`train_trp` return.

    ``model``: the compact factorized model (rankslim plan attached: :func:`rankslim.save` works);
    ``projected_model``: the dense model after the final projection; ``ranks``: ``{layer: r}``;
    ``projected_acc`` / ``compact_acc``: accuracy of both on the held-out validation split (and
    ``*_test_acc`` on ``test_data`` when given); ``max_logit_diff``: the largest |logit| difference of the two
    on validation inputs; ``projections``: how many projections ran; ``report``: the compression report."""

    model: nn.Module
    projected_model: nn.Module
    ranks: dict[str, int]
    projected_acc: float | None
    compact_acc: float | None
    projected_test_acc: float | None
    compact_test_acc: float | None
    max_logit_diff: float
    projections: int
    history: list[dict]
    report: Any
    strategy: str
    files: dict[str, Path] = field(default_factory=dict)


def _max_logit_diff(a: nn.Module, b: nn.Module, data: Dataset, device: torch.device) -> float:
    x = sample_inputs(data, 256).to(device)
    a.eval(), b.eval()
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def train_projected(
    model: nn.Module,
    data: str | Dataset | DataLoader,
    *,
    kind: str,
    rank_ratio: float,
    period: int | None,
    energy_transfer: bool,
    bn_rectify: bool,
    eps: float,
    recalibrate_bn_samples: int = 512,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    schedule: str,
    strategy: str = "lrpet",
    switch_epoch: int | None = None,
    regularizer: Callable[[list[ProjectionTarget]], torch.Tensor] | None = None,
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
    extra_config: Mapping[str, Any] | None = None,
) -> LRPETResult:
    """The engine behind :func:`train_lrpet` and :func:`rankslim.train.trp.train_trp` (see their docs)."""
    if strategy not in STRATEGIES:
        raise RankslimError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    ctx = D.setup(device)
    try:
        work = model if inplace else copy.deepcopy(model)
        work.to(ctx.device)
        train_set, val_set, _ = training_split(data, val_fraction, seed)
        sample = sample_inputs(train_set, 8)
        input_shape = tuple(sample.shape[1:])
        targets = select_projection_targets(work, input_shape, rank_ratio, include, exclude, min_params, keep_stem,
                                            keep_head, bn_rectify, sample)
        ranks = {t.name: t.rank for t in targets}
        projector = Projector(targets, energy_transfer=energy_transfer, eps=eps, ctx=ctx)
        steps_per_epoch = math.ceil(math.ceil(len(train_set) / ctx.world_size) / (batch_size // ctx.world_size)) \
            if batch_size % ctx.world_size == 0 else 1
        T = int(period) if period else steps_per_epoch
        if T < 1:
            raise RankslimError(f"the projection period T must be >= 1 iteration, got {period}")
        config = {"kind": kind, "rank_ratio": rank_ratio, "period": T, "energy_transfer": energy_transfer,
                  "bn_rectify": bn_rectify, "eps": eps, "strategy": strategy, "switch_epoch": switch_epoch,
                  "val_fraction": val_fraction, **dict(extra_config or {})}
        common = dict(lr=lr, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                      schedule=schedule, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume, patience=None,
                      restore_best=False, progress=progress, ctx=ctx)
        horizon = lambda e: schedule_factor(schedule, e, epochs)  # noqa: E731  (one schedule over all stages)

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = m(x)
            loss = nn.functional.cross_entropy(logits, y)
            if regularizer is not None:
                loss = loss + regularizer(targets)
            return loss, logits

        def after_step(step: int) -> None:
            if step % T == 0:
                projector.project()

        def state() -> dict:
            return {"projections": projector.count}

        def set_state(s: Any) -> None:
            projector.count = int((s or {}).get("projections", 0))

        def metrics(_e: int) -> dict:
            return {"projections": projector.count, "proj_rel_change": round(projector.last_rel_change, 6)}

        history: list[dict] = []
        files: dict[str, Path] = {}
        if strategy == "factorized":
            # Table VIII "From Scratch" / "Fine Tuning": decompose at once, then ordinary training
            compact, report = to_compact(work, ranks, input_shape)
            res = fit(compact, train_set, val_set, epochs=epochs, lr_lambda=horizon, config=config,
                      desc=f"{kind} (factorized)", **common)
            history, files, final_compact = res.history, res.files, compact
            projected = compact
        else:
            lrpet_epochs = epochs if strategy == "lrpet" else int(switch_epoch or epochs // 2)
            if not 1 <= lrpet_epochs <= epochs:
                if switch_epoch is None:
                    raise RankslimError(f"strategy='early-stop' switches to ordinary training at epoch epochs // 2, "
                                        f"so it needs epochs >= 2 (got {epochs}) or an explicit switch_epoch")
                raise RankslimError(f"switch_epoch must lie in [1, {epochs}], got {switch_epoch}")
            res = fit(work, train_set, val_set, epochs=lrpet_epochs, lr_lambda=horizon, loss_fn=loss_fn,
                      after_step=after_step, epoch_metrics=metrics, extra_state=(state, set_state),
                      config=config, desc=kind, **common)
            history, files = res.history, res.files
            last_step = lrpet_epochs * steps_per_epoch
            if last_step % T != 0:
                projector.project()  # the final weights must lie on the low-rank manifold
            if recalibrate_bn_samples and any(isinstance(m, _BN) for m in work.modules()):
                # the last projection moved the weights (BN rectification rescales rows) after the running
                # statistics were last updated: re-estimate them, or eval-mode BN normalises with stale ones
                from ..bn import recalibrate_bn
                from ..data import calibration_batches
                recalibrate_bn(work, [b.to(ctx.device) for b in
                                      calibration_batches(train_set, recalibrate_bn_samples, seed=seed)])
            D.sync_buffers(ctx, work)
            projected = work
            final_compact, report = to_compact(work, ranks, input_shape)
            if strategy == "early-stop" and lrpet_epochs < epochs:
                # Table VIII "Early Stop & Ordinary Training": the compact net continues the same schedule
                res2 = fit(final_compact, train_set, val_set, epochs=epochs - lrpet_epochs, lr_lambda=horizon,
                           epoch_offset=lrpet_epochs, prior_history=history, config=config,
                           checkpoint_name="checkpoint-stage2.pt", desc=f"{kind} (ordinary)", **common)
                history = history + res2.history
                files = {**files, "checkpoint_stage2": res2.files.get("checkpoint")} if res2.files else files
                projected = final_compact
        compact_model = final_compact
        dev = ctx.device
        pa = evaluate(projected, val_set, device=dev)[1] if val_set is not None else None
        ca = evaluate(compact_model, val_set, device=dev)[1] if val_set is not None else None
        pt = ct = None
        if test_data is not None:
            from ..data import as_loader
            test_loader = as_loader(test_data, 512, split="test")
            pt = evaluate(projected, test_loader.dataset, device=dev)[1]
            ct = evaluate(compact_model, test_loader.dataset, device=dev)[1]
        diff = _max_logit_diff(projected, compact_model, val_set or train_set, dev)
        return LRPETResult(compact_model, projected, ranks, pa, ca, pt, ct, diff, projector.count, history, report,
                           strategy, files)
    finally:
        D.teardown(ctx)


def train_lrpet(
    model: nn.Module,
    data: str | Dataset | DataLoader,
    *,
    rank_ratio: float = 0.5,
    period: int | None = None,
    energy_transfer: bool = True,
    bn_rectify: bool = True,
    eps: float = 1e-5,
    recalibrate_bn_samples: int = 512,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    schedule: str = "step",
    strategy: str = "lrpet",
    switch_epoch: int | None = None,
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
    """Train ``model`` (random or pretrained) with LRPET and return it as a compact factorized model.

    ``rank_ratio`` is the paper's ``P``: layer ``l`` keeps rank ``⌊(1 − P)·min(m, n)⌋`` of its ``(m, n)``
    (im2col) weight.  ``period`` is ``T`` in optimizer iterations (default: one epoch).  SGD with momentum
    0.9, weight decay 5e-4 and the step schedule (÷10 at 50 % and 75 % of ``epochs``) are the paper's CIFAR
    settings (``lr`` 0.1 from scratch, 0.01 from a pretrained model).  ``energy_transfer`` / ``bn_rectify``
    switch eqs. 6 and 7-10 (Table VII); ``strategy`` picks Table VIII's strategies (module doc).  ``include``,
    ``exclude``, ``keep_stem``, ``keep_head``, ``min_params`` choose layers as in :func:`rankslim.compress`.  ``val_fraction``
    of the training data is held out for the reported accuracies; ``test_data`` (e.g. ``"fashion-mnist"``: its
    test split) is only evaluated at the end.  ``batch_size`` is global under ``torchrun``.
    """
    return train_projected(model, data, kind="lrpet", rank_ratio=rank_ratio, period=period,
                           energy_transfer=energy_transfer, bn_rectify=bn_rectify, eps=eps, epochs=epochs, lr=lr,
                           recalibrate_bn_samples=recalibrate_bn_samples,
                           momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, schedule=schedule,
                           strategy=strategy, switch_epoch=switch_epoch, include=include, exclude=exclude,
                           keep_stem=keep_stem, keep_head=keep_head, min_params=min_params, val_fraction=val_fraction,
                           test_data=test_data, checkpoint_dir=checkpoint_dir, resume=resume, seed=seed,
                           inplace=inplace, progress=progress, device=device)


__all__ = ["LRPETResult", "ProjectionTarget", "Projector", "STRATEGIES", "bn_scale", "conv_bn_pairs", "lrpet_rank",
           "project_weight", "select_projection_targets", "to_compact", "train_lrpet", "train_projected"]
