"""``rankslim finetune`` and ``rankslim train``: thin shells over :mod:`rankslim.train`.

Both write only their own file names into ``--out`` (``model.rankslim``, ``metrics.csv``, ``curves.png``,
``checkpoint.pt``), each atomically, and never delete anything there.  Under ``torchrun`` only rank 0
prints and writes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import RankslimError

console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    raise typer.Exit(code=2)


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _save(model, path: Path, spec: Optional[str]) -> None:
    from . import io
    from .plan import get_plan
    if spec is not None:
        get_plan(model).model_spec = spec
    io.save(model.cpu(), path)  # io.save writes a temporary file and renames it


def _load_compressed(path: str, base: Optional[str]):
    """The compressed model in ``path`` and the spec it was made from (``None`` for user models)."""
    from . import io
    p = Path(path)
    if not p.is_file():
        raise RankslimError(f"no such file: {p} (give a .rankslim file written by `rankslim compress`)")
    plan = io.read_plan(p)
    model = io.load(p, model=base) if base else io.load(p)
    return model, plan.model_spec


def finetune_cmd(
    path: str = typer.Argument(..., help="a compressed model (.rankslim) written by `rankslim compress`"),
    data: Optional[str] = typer.Option(None, "--data", help="fashion-mnist | mnist | digits (default: the zoo "
                                                            "model's dataset)"),
    epochs: int = typer.Option(1, "--epochs", help="training epochs"),
    lr: float = typer.Option(0.01, "--lr", help="base learning rate (SGD, momentum 0.9)"),
    batch_size: int = typer.Option(128, "--batch-size", help="global batch size (split across torchrun ranks)"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | step | constant"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher model spec (default: the spec the file "
                                                                  "was compressed from, if it is zoo:/torchvision:)"),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill",
                                           help="distil from the teacher (default: when a teacher is known)"),
    temperature: float = typer.Option(4.0, "--temperature"),
    alpha: float = typer.Option(0.9, "--alpha", help="weight of the soft (distillation) term"),
    base: Optional[str] = typer.Option(None, "--base", help="model definition for files made from a user model, "
                                                            "e.g. package.module:function"),
    phased: bool = typer.Option(False, "--phased", help="GreBdec's 3 phases: conv (FC frozen), FC, all at lr/10"),
    patience: Optional[int] = typer.Option(None, "--patience", help="early stopping on the held-out train split"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="fraction of the TRAIN split held out"),
    bn_recalibrate: bool = typer.Option(True, "--bn-recalibrate/--no-bn-recalibrate"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="test images for the final accuracy"),
    out: Path = typer.Option(Path("rankslim-out/finetune"), "--out", "-o", help="output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue the run whose checkpoint.pt is in --out"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Fine-tune a compressed model (optionally distilling from the original) and write it to --out."""
    from .data import evaluate_accuracy, load_dataset
    from .train import finetune
    try:
        model, spec = _load_compressed(path, base)
        if data is None:
            from .zoo import ZOO
            if spec and spec.startswith("zoo:") and spec[4:] in ZOO:
                data = ZOO[spec[4:]].dataset
            else:
                raise RankslimError("say which data to train on: --data fashion-mnist | mnist | digits")
        t_spec = teacher or (spec if spec and spec.startswith(("zoo:", "torchvision:")) else None)
        if distill and t_spec is None:
            raise RankslimError("--distill needs a teacher: pass --teacher SPEC (the original, trained model)")
        use_teacher = t_spec if (distill is None or distill) else None
        res = finetune(model, data, teacher=use_teacher, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
                       batch_size=batch_size, weight_decay=weight_decay, schedule=schedule, patience=patience,
                       val_fraction=val_fraction, phased=phased, bn_recalibrate=bn_recalibrate,
                       checkpoint_dir=out, resume=resume, seed=seed, progress=_main_rank())
        if _main_rank():
            _save(res.model, out / "model.rankslim", spec)
            console.print(f"distillation: {'on (teacher ' + str(use_teacher) + ')' if res.distilled else 'off'}; "
                          f"masked layers kept sparse: {res.masked_layers}")
            if res.val_acc_before is not None:
                console.print(f"held-out (train split) accuracy: {res.val_acc_before:.4f} -> {res.val_acc_after:.4f}"
                              f" (kept epoch {res.best_epoch})")
            test = load_dataset(data, "test")
            console.print(f"test accuracy ({data}): {evaluate_accuracy(res.model, test, max_samples=eval_samples):.4f}")
            console.print(f"[green]wrote[/] {out}/model.rankslim, metrics.csv, curves.png, checkpoint.pt")
    except RankslimError as exc:
        _fail(exc)


def train_cmd(
    model: str = typer.Argument(..., help="model spec: zoo:NAME, torchvision:NAME[@w.pth], file, package.module:fn"),
    method: str = typer.Option("lrpet", "--method", "-m", help="lrpet | trp"),
    data: Optional[str] = typer.Option(None, "--data", help="fashion-mnist | mnist | digits (default: the zoo "
                                                            "model's dataset)"),
    rank_ratio: float = typer.Option(0.5, "--rank-ratio", "-P", help="P: layer rank = floor((1-P) min(m, n))"),
    epochs: int = typer.Option(10, "--epochs"),
    lr: float = typer.Option(0.1, "--lr", help="0.1 from scratch, 0.01 from a pretrained model (paper)"),
    batch_size: int = typer.Option(128, "--batch-size", help="global batch size (split across torchrun ranks)"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    schedule: str = typer.Option("step", "--schedule", help="step (/10 at 50%, 75%) | cosine | constant"),
    period: Optional[int] = typer.Option(None, "--period", "-T", help="projection every T iterations "
                                                                     "(lrpet default: one epoch; trp: 1)"),
    energy_transfer: bool = typer.Option(True, "--energy-transfer/--no-energy-transfer", help="LRPET eq. 6"),
    bn_rectify: bool = typer.Option(True, "--bn-rectify/--no-bn-rectify", help="LRPET eqs. 7-10"),
    strategy: str = typer.Option("lrpet", "--strategy", help="lrpet | factorized | early-stop (Table VIII)"),
    switch_epoch: Optional[int] = typer.Option(None, "--switch-epoch", help="early-stop: epochs of LRPET"),
    nuclear_weight: float = typer.Option(0.0, "--nuclear-weight", help="trp: weight of the nuclear-norm term"),
    scratch: bool = typer.Option(False, "--scratch", help="re-initialise the weights (train from scratch)"),
    keep_stem: bool = typer.Option(False, "--keep-stem", help="leave convs with <= 3 input channels dense"),
    out: Path = typer.Option(Path("rankslim-out/train"), "--out", "-o", help="output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue the run whose checkpoint.pt is in --out"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train MODEL into a low-rank compact model with LRPET (or the TRP baseline) and write it to --out."""
    import torch

    from .train import train_lrpet, train_trp
    from .zoo import resolve_model
    try:
        if method not in ("lrpet", "trp"):
            raise RankslimError(f"unknown training method {method!r}; use lrpet or trp")
        spec = resolve_model(model)
        data = data or spec.dataset
        if data is None:
            raise RankslimError("say which data to train on: --data fashion-mnist | mnist | digits")
        net = spec.model
        if scratch:
            torch.manual_seed(seed)
            for m in net.modules():
                if hasattr(m, "reset_parameters") and m is not net:
                    m.reset_parameters()
        common = dict(rank_ratio=rank_ratio, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                      schedule=schedule, keep_stem=keep_stem, checkpoint_dir=out, resume=resume, seed=seed,
                      progress=_main_rank(), test_data=data)
        if method == "lrpet":
            res = train_lrpet(net, data, period=period, energy_transfer=energy_transfer, bn_rectify=bn_rectify,
                              strategy=strategy, switch_epoch=switch_epoch, **common)
        else:
            res = train_trp(net, data, period=period or 1, nuclear_weight=nuclear_weight, **common)
        if _main_rank():
            _save(res.model, out / "model.rankslim", spec.spec if spec.spec and spec.spec.startswith(
                ("zoo:", "torchvision:")) else None)
            console.print(f"ranks: {res.ranks}")
            console.print(f"projections: {res.projections}; held-out accuracy projected {res.projected_acc:.4f}, "
                          f"compact {res.compact_acc:.4f}; test accuracy projected {res.projected_test_acc:.4f}, "
                          f"compact {res.compact_test_acc:.4f}; max |logit diff| {res.max_logit_diff:.2e}")
            if res.report is not None:
                for line in res.report.totals_lines():
                    console.print(line)
            console.print(f"[green]wrote[/] {out}/model.rankslim, metrics.csv, curves.png, checkpoint.pt")
    except RankslimError as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` and ``train`` commands to the ``rankslim`` CLI app."""
    app.command("finetune")(finetune_cmd)
    app.command("train")(train_cmd)


__all__ = ["register", "finetune_cmd", "train_cmd"]
