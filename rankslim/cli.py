"""The ``rankslim`` command line: a thin shell over :func:`rankslim.compress` and friends."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from .errors import InputShapeError, RankslimError
from .outputs import DEFAULT_ROOT, check_output_dir, default_output_dir, write_outputs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained PyTorch networks smaller and faster by low-rank and sparse decomposition.")
# rich falls back to 80 columns when not on a terminal, which truncates the per-layer table in logs
console = Console() if sys.stdout.isatty() else Console(width=180)
# soft_wrap: an error is one line however long, so logs and scripts see it whole
err_console = Console(stderr=True, soft_wrap=True)

#: the main job on bundled defaults: the reference ResNet on Fashion-MNIST at half the MACs
DEFAULT_MODEL = "zoo:resnet20"
DEFAULT_MACS = 0.5
#: ... followed by a short distillation fine-tune from the original model (README "Set up and run": measured
#: result and time); the subset keeps it to a few minutes on 2 CPU cores
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_FINETUNE_SAMPLES = 12000
DEFAULT_FINETUNE_LR = 0.01
#: accuracy drops larger than this (a fraction: 0.03 is 3 points) get a warning after compress
ACCURACY_DROP_WARN = 0.03
#: set to see the Python traceback of an internal error instead of the one-line summary
DEBUG_ENV = "RANKSLIM_DEBUG"


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise RankslimError(f"--input-shape must look like 3,224,224, got {text!r}") from None


def _glob_values(pairs: list[str], flag: str, kind: str) -> dict[str, str]:
    """``'fc*=8,conv1=4'`` (comma-separated, repeatable) as ``{glob: value}``; ``kind`` describes a value in errors."""
    out: dict[str, str] = {}
    for item in ",".join(pairs).split(","):
        item = item.strip()
        if not item:
            continue
        glob, sep, value = item.rpartition("=")
        if not sep or not glob.strip() or not value.strip():
            raise RankslimError(f"{flag} expects glob={kind} items such as 'fc*={'8' if kind == 'rank' else 'svd'}', "
                                f"got {item!r}")
        out[glob.strip()] = value.strip()
    return out


def _ranks(pairs: list[str]) -> Optional[object]:
    """``--ranks``: one integer for every layer, or ``glob=rank`` items."""
    if not pairs:
        return None
    if len(pairs) == 1 and pairs[0].strip().isdigit():
        return int(pairs[0])
    out = {}
    for glob, value in _glob_values(pairs, "--ranks", "rank").items():
        if not value.isdigit():
            raise RankslimError(f"--ranks: the rank of {glob!r} must be a positive integer, got {value!r}")
        out[glob] = int(value)
    return out


def _options(pairs: list[str], flag: str) -> dict:
    """Parse repeated ``key=value`` options; values are JSON when they parse (numbers, lists, dicts), else strings."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise RankslimError(f"{flag} takes key=value, got {p!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _fail(exc: Exception) -> None:
    # Text, not markup: a message holding [brackets] (lists, globs) must print as written
    err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
    raise typer.Exit(code=2)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Every command's body: a user error is one line and exit 2 (:func:`_fail`), anything else a bug (exit 1,
    :func:`_internal`); typer's own control flow passes through."""
    try:
        yield
    except RankslimError as exc:
        _fail(exc)
    except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own control flow, not bugs
        raise
    except Exception as exc:
        _internal(exc)


def _internal(exc: Exception) -> None:
    """An exception that is not a user error: a bug. One line with what to do, exit 1 (2 is for bad input)."""
    if os.environ.get(DEBUG_ENV):
        raise exc
    err_console.print(Text.assemble(
        ("internal error: ", "bold red"), f"{type(exc).__name__}: {exc} — this is a bug in rankslim; please "
        f"report it with the command you ran (rerun with {DEBUG_ENV}=1 to see the traceback)"))
    raise typer.Exit(code=1)


def _option_error(exc: Exception, method_option: list[str], allocator_option: list[str]) -> RankslimError:
    """A ValueError/TypeError from deep code while the user passed -M/-A options: almost always those options
    (an unknown key, a string where a number is needed), so it is reported as bad input naming them."""
    flags = [f for f, given in (("--method-option", method_option), ("--allocator-option", allocator_option))
             if given]
    given = " ".join([f"-M {o}" for o in method_option] + [f"-A {o}" for o in allocator_option])
    return RankslimError(f"{' or '.join(flags)} rejected ({given}): {exc}; check the option names and value "
                         f"types (if they are right, rerun with {DEBUG_ENV}=1 and report the traceback)")


def _speed_choice(speed_aware: bool, mac_only: bool, batch: Optional[int], max_seconds: Optional[float],
                  check: bool = True, runtime: Optional[str] = None, time_aware: bool = True,
                  error_slack: Optional[float] = None):
    """``compress(speed_aware=...)`` from the tri-state flags: ``--speed-aware`` on, ``--mac-only`` off, neither
    auto; options that cannot apply to the chosen state are refused (they would be silently ignored)."""
    if mac_only and not check:
        raise RankslimError("--no-speed-check skips the whole-model check of speed-aware allocation, which --mac-only "
                            "turns off: drop one of them")
    if mac_only and (not time_aware or error_slack is not None):
        flag = "--no-time-aware" if not time_aware else "--speed-error-slack"
        raise RankslimError(f"{flag} sets the time-aware step of speed-aware allocation, which --mac-only turns off: "
                            "drop one of them")
    if speed_aware and mac_only:
        raise RankslimError("--speed-aware and --mac-only contradict each other: pass one of them, or neither for "
                            "auto (speed-aware for a --macs budget when measuring is cheap)")
    if mac_only and (batch is not None or max_seconds is not None or runtime is not None):
        flag = ("--speed-batch" if batch is not None else "--speed-runtime" if runtime is not None
                else "--speed-max-seconds")
        raise RankslimError(f"{flag} sets how speed-aware allocation measures, which --mac-only turns off: drop one "
                            "of them")
    if speed_aware and max_seconds is not None:
        raise RankslimError("--speed-max-seconds is the threshold of auto mode; --speed-aware measures whatever it "
                            "costs: drop one of them")
    if mac_only:
        return False
    opts = {k: v for k, v in (("runtime", runtime), ("batch", batch), ("max_seconds", max_seconds)) if v is not None}
    if not check:
        opts["check"] = False
    if not time_aware:
        opts["time_aware"] = False
    if error_slack is not None:
        opts["error_slack"] = error_slack
    if speed_aware:
        return opts or True
    return {"mode": "auto", **opts} if opts else "auto"


def _latency_budget(value: Optional[str]) -> Optional[float]:
    """``--latency-budget`` as a fraction in (0, 1]; read as text so that a non-number is one line, not typer's box."""
    if value is None:
        return None
    from .latency_budget import check_fraction
    try:
        number = float(value)
    except ValueError:
        raise RankslimError(f"--latency-budget takes a fraction in (0, 1] of the original model's measured time "
                            f"(0.5: at most half of it), got {value!r}") from None
    return check_fraction(number)


def _require_shape(spec) -> tuple[int, ...]:
    if spec.input_shape is None:
        raise InputShapeError(f"the input shape of {spec.spec or 'this model'} is not known: pass the per-sample "
                              "shape with --input-shape, e.g. --input-shape 3,32,32")
    return spec.input_shape


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help="zoo:NAME, torchvision:NAME[@weights.pth], a saved module file, "
                                                     "or package.module:function. Default: the bundled reference ResNet."),
    method: str = typer.Option("svd", "--method", "-m", help="decomposition method (see `rankslim methods`)"),
    params: Optional[float] = typer.Option(None, "--params", help="keep this fraction of the model's parameters"),
    macs: Optional[float] = typer.Option(None, "--macs", help="keep this fraction of the model's MACs"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="rank / full rank for every layer"),
    energy: Optional[float] = typer.Option(None, "--energy", help="keep this fraction of squared singular values"),
    allocator: Optional[str] = typer.Option(None, "--allocator", "-a", help="rank allocator for budgets (default cptv)"),
    data: Optional[str] = typer.Option(None, "--data", help="fashion-mnist | mnist | digits (calibration + accuracy), "
                                       "or your own calibration data: a .npy/.pt file of inputs or "
                                       "package.module:function returning a Dataset, DataLoader or tensor"),
    ranks: list[str] = typer.Option([], "--ranks", help="explicit ranks: one integer, or glob=rank items "
                                                        "('fc*=8,conv1=4'; repeatable)"),
    methods: list[str] = typer.Option([], "--methods", help="per-layer method: glob=name ('fc*=zhang'; repeatable); "
                                                            "other layers use --method"),
    example_inputs: Optional[str] = typer.Option(None, "--example-inputs",
                                                 help="model inputs to count MACs on (token ids, tuples, dicts): a "
                                                      ".pt/.npy file or package.module:function"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="output directory (default: rankslim-out/<model>-<method>-<budget>); "
                                            "a non-empty directory rankslim did not write is refused"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty directory rankslim did not write; "
                                                      "only rankslim's own file names are written, nothing deleted"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape, e.g. 3,224,224"),
    include: list[str] = typer.Option([], "--include", help="only layers matching this glob (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="skip layers matching this glob (repeatable)"),
    min_params: int = typer.Option(0, "--min-params", help="skip layers with fewer weights"),
    keep_stem: bool = typer.Option(False, "--keep-stem", help="leave convs with <= 3 input channels dense"),
    keep_head: bool = typer.Option(True, "--keep-head/--no-keep-head",
                                   help="leave the output head (the layer producing the logits) dense"),
    round_to: int = typer.Option(1, "--round-to", help="round ranks up to a multiple of this"),
    calib_samples: int = typer.Option(256, "--calib-samples", help="calibration samples for data-aware methods"),
    calib_batch: int = typer.Option(64, "--calib-batch",
                                    help="calibration samples per forward pass: lower it to bound calibration memory"),
    calib_memory: Optional[float] = typer.Option(None, "--calib-memory", metavar="MIB",
                                                 help="MiB of activations calibration may keep between layers "
                                                      "(default 1024); past it batches are recomputed"),
    sequential: bool = typer.Option(True, "--sequential/--independent",
                                    help="data-aware methods see inputs from the already-compressed layers (eq. 1)"),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="test images for accuracy (default all)"),
    seed: int = typer.Option(0, "--seed"),
    onnx: bool = typer.Option(False, "--onnx", help="also export model.onnx and check it with onnxruntime"),
    method_option: list[str] = typer.Option([], "--method-option", "-M",
                                            help="method option key=value (JSON value), repeatable, e.g. eps=0.05"),
    allocator_option: list[str] = typer.Option([], "--allocator-option", "-A",
                                               help="allocator option key=value (JSON value), repeatable"),
    bn_recalibrate: bool = typer.Option(False, "--bn-recalibrate",
                                        help="re-estimate BatchNorm statistics on the calibration data"),
    speed_aware: bool = typer.Option(False, "--speed-aware",
                                     help="always allocate speed-aware: factorize a layer only at ranks measured faster "
                                          "than dense on this machine (timings cached; budgets still met exactly). "
                                          "Default: auto, speed-aware for a --macs budget when measuring is cheap "
                                          "(see docs/speed.md)"),
    mac_only: bool = typer.Option(False, "--mac-only", "--no-speed-aware",
                                  help="never measure: allocate ranks by MACs/params alone"),
    speed_batch: Optional[int] = typer.Option(None, "--speed-batch",
                                              help="batch size the speed-aware timings use (default 1)"),
    speed_runtime: Optional[str] = typer.Option(None, "--speed-runtime",
                                                help="runtime the speed-aware timings use: eager (default), eager-cl "
                                                     "(channels-last PyTorch) or onnxruntime"),
    speed_check: bool = typer.Option(True, "--speed-check/--no-speed-check",
                                     help="speed-aware mode: time the built model against the original and, when it "
                                          "is not faster, keep more layers dense (default on; see docs/speed.md)"),
    time_aware: bool = typer.Option(True, "--time-aware/--no-time-aware",
                                    help="speed-aware mode: after the allocator, take the fastest allocation (layer "
                                         "timings) meeting the budget with no larger error proxy (default on)"),
    speed_error_slack: Optional[float] = typer.Option(
        None, "--speed-error-slack", help="time-aware step: allow this fraction more error proxy than the allocator's "
                                          "for speed (default 0)"),
    speed_max_seconds: Optional[float] = typer.Option(
        None, "--speed-max-seconds", help="auto mode: measure only when the estimated measuring time is at most this "
                                          "many seconds (default 20)"),
    max_drop: Optional[str] = typer.Option(
        None, "--max-drop", help="accuracy target: the smallest budget whose model loses at most this much accuracy "
                                 "on held-out TRAINING data, e.g. 1% or 0.01 (searches --params, or --macs if given; "
                                 "a given value is the largest budget allowed)"),
    finetune_epochs: Optional[int] = typer.Option(
        None, "--finetune-epochs", help="fine-tune the compressed model this many epochs on the training data "
                                        f"(default 0; the bundled job: {DEFAULT_FINETUNE_EPOCHS})"),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr",
                                                help=f"fine-tuning learning rate (SGD, cosine; default {DEFAULT_FINETUNE_LR})"),
    finetune_samples: Optional[int] = typer.Option(
        None, "--finetune-samples", help="fine-tune on a seeded subset of this many training images (default all; "
                                         f"the bundled job: {DEFAULT_FINETUNE_SAMPLES})"),
    distill: bool = typer.Option(True, "--distill/--no-distill",
                                 help="fine-tune by distillation from the original model (T=4, alpha=0.9)"),
    latency: bool = typer.Option(False, "--latency", help="measure CPU latency of original vs compressed (eager, "
                                                          "batch 1, 1 thread) into the report (see docs/speed.md)"),
    latency_budget: Optional[str] = typer.Option(
        None, "--latency-budget", help="keep the compressed model's MEASURED time at most this fraction of the "
                                       "original's (eager, batch 1 or --speed-batch, torch's threads); combines with "
                                       "--params or with --macs, not both (see docs/speed.md)"),
) -> None:
    """Compress MODEL and write the compressed model, report.json and report.md to --out.

    With no MODEL: the reference ResNet-20 on Fashion-MNIST at --macs 0.5, with --bn-recalibrate --keep-stem and a
    short distillation fine-tune (--finetune-epochs 2 --finetune-samples 12000 unless given).

    Allocation: speed-aware (layers timed on this machine) or MAC-only is chosen automatically — speed-aware for a
    --macs budget when measuring is cheap; --speed-aware / --mac-only force either.  The summary's "allocation:"
    line says which was used and why.

    Latency budget: --latency-budget 0.5 keeps the compressed model's measured time (eager, batch 1 or --speed-batch)
    at most half the original's; the summary's "latency:" line gives the requested, predicted and measured fractions.
    With --macs 0.5 as well, both hold: the least-error model within half the MACs and half the time.
    """
    from . import api, io
    from .data import evaluate_accuracy, load_dataset
    from .zoo import resolve_model

    with cli_errors():
        speed = _speed_choice(speed_aware, mac_only, speed_batch, speed_max_seconds, speed_check, speed_runtime,
                              time_aware, speed_error_slack)
        latency_fraction = _latency_budget(latency_budget)
        if model is None:
            # the bundled main job: reference ResNet-20, half the MACs, stem kept dense, BatchNorm re-estimated
            # (see docs/results/svd_baseline.md for what each of these is worth)
            model = DEFAULT_MODEL
            if all(v is None for v in (params, macs, ratio, energy, latency_fraction)) and max_drop is None:
                macs = DEFAULT_MACS
            bn_recalibrate = keep_stem = True
            if finetune_epochs is None and max_drop is None:  # with --max-drop every candidate would be tuned
                finetune_epochs = DEFAULT_FINETUNE_EPOCHS
                finetune_samples = finetune_samples or DEFAULT_FINETUNE_SAMPLES
        finetune_epochs = finetune_epochs or 0
        if finetune_epochs < 0:
            raise RankslimError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
        ft_opts = {"distill": distill, "lr": finetune_lr or DEFAULT_FINETUNE_LR, "train_samples": finetune_samples,
                   "val_fraction": 0.1}
        out = out if out is not None else default_output_dir(
            model, method, {"params": params, "macs": macs, "ratio": ratio, "energy": energy,
                            "latency": latency_fraction}, allocator)
        names = ["model.rankslim", "report.json", "report.md"] + (["model.onnx"] if onnx else [])
        # before the long compression: a refused directory costs nothing and nothing is written
        check_output_dir(out, names, force)
        m_opts = _options(method_option, "--method-option")
        a_opts = _options(allocator_option, "--allocator-option")
        spec = resolve_model(model, input_shape=_shape(input_shape))
        from .data import DATASETS
        from .inputs import load_user_object
        example = load_user_object(example_inputs, "--example-inputs") if example_inputs else None
        # a name is a bundled dataset (calibration + accuracy); anything else is the user's calibration data
        own_data = load_user_object(data, "--data") if data is not None and data not in DATASETS else None
        shape = spec.input_shape if (example is not None or own_data is not None) else _require_shape(spec)
        dataset = (data if own_data is None else None) or (spec.dataset if own_data is None else None)
        rank_map = _ranks(ranks)
        method_map = _glob_values(methods, "--methods", "method") or None
        if (finetune_epochs or max_drop is not None) and dataset is None:
            raise RankslimError(f"{'--max-drop' if max_drop is not None else '--finetune-epochs'} needs labelled "
                                "training data: pass --data fashion-mnist | mnist | digits")
        if max_drop is not None:
            from .target import parse_drop
            parse_drop(max_drop)  # nonsense is refused before any work
        try:
            result = api.compress(
                spec.model, method, params=params, macs=macs, ratio=ratio, energy=energy, allocator=allocator,
                ranks=rank_map, methods=method_map, example_inputs=example,
                input_shape=shape if example is None else None, include=include or None, exclude=exclude or None,
                min_params=min_params, keep_stem=keep_stem, keep_head=keep_head, round_to=round_to,
                data=own_data if own_data is not None else dataset,
                calib_samples=calib_samples, calib_batch_size=calib_batch, calib_memory_mib=calib_memory,
                sequential=sequential, seed=seed, bn_recalibrate=bn_recalibrate,
                speed_aware=speed, progress=console.is_terminal, method_options=m_opts, allocator_options=a_opts,
                max_drop=max_drop, latency=latency_fraction,
                finetune_epochs=finetune_epochs if max_drop is not None else 0,
                finetune_options=ft_opts if max_drop is not None and finetune_epochs else None)
        except (TypeError, ValueError) as exc:
            if not (m_opts or a_opts):
                raise
            raise _option_error(exc, method_option, allocator_option) from exc
        result.plan.model_spec = spec.spec
        if dataset is not None:
            test_set = load_dataset(dataset, "test")
            with console.status(f"evaluating on {dataset} test split..."):
                before = evaluate_accuracy(spec.model, test_set, max_samples=eval_samples)
                after = evaluate_accuracy(result.model, test_set, max_samples=eval_samples)
            result.report.metrics.update({"dataset": dataset, "accuracy_before": before, "accuracy_after": after,
                                          "accuracy_drop": before - after})
            if finetune_epochs and max_drop is None:
                from .target import finetune_compressed
                console.print(f"compressed: test accuracy {100 * after:.2f}% (original {100 * before:.2f}%); "
                              f"fine-tuning {finetune_epochs} epoch(s)"
                              + (" with distillation from the original" if distill else ""))
                finetune_compressed(result, spec.model, dataset, finetune_epochs, ft_opts, seed=seed,
                                    progress=console.is_terminal)
                with console.status(f"evaluating the fine-tuned model on {dataset} test split..."):
                    tuned = evaluate_accuracy(result.model, test_set, max_samples=eval_samples)
                # accuracy_after / accuracy_drop describe the saved (final) model
                result.report.metrics.update({"accuracy_compressed": after, "accuracy_finetuned": tuned,
                                              "accuracy_after": tuned, "accuracy_drop": before - tuned})
                after = tuned
        if latency:
            from .bench import add_latency
            with console.status("measuring latency..."):
                add_latency(result.report, spec.model, result.model, shape)
        console.print(result.report.rich_table())
        for line in result.report.totals_lines():
            console.print(line)
        for s in result.report.skipped:
            console.print(f"[yellow]skipped[/] {s['name']} ({s['type']}): {s['reason']}")
        lat = result.report.metrics.get("latency") or {}
        if lat.get("over"):
            console.print(Text(f"warning: the compressed model measured {lat['measured']:.3f} of the original's time, "
                               f"over the latency budget {lat['requested']:g} (predicted {lat['predicted']:.3f}); "
                               "timings are noisy: re-measure on an idle machine (rankslim bench)", style="yellow"),
                          soft_wrap=True)
        search = result.report.metrics.get("max_drop")
        if search:
            console.print(f"max-drop search: {search['evaluations']} budgets tried; chose {search['quantity']} "
                          f"{search['chosen_budget']:.4f} (held-out training accuracy, original "
                          f"{100 * search['original_accuracy']:.2f}%)")
        if dataset is not None and before - after > ACCURACY_DROP_WARN:
            console.print(Text(f"warning: accuracy fell from {100 * before:.1f}% to {100 * after:.1f}% "
                               f"({100 * (before - after):.1f} points); try a larger budget, a data-aware method "
                               "(`rankslim methods`), or fine-tuning the compressed model", style="yellow"), soft_wrap=True)
        written = _write_outputs(result, out, io, onnx_shape=shape if onnx else None, force=force)
        console.print(f"[green]wrote[/] {out}/model.rankslim, report.json, report.md{', model.onnx' if onnx else ''}")
        if written.stale:
            console.print(f"[yellow]note:[/] {', '.join(written.stale)} in {out} are from an earlier run "
                          "(rankslim deletes nothing)")


def _write_outputs(result, out: Path, io, onnx_shape: Optional[tuple[int, ...]] = None, force: bool = False):
    """Write model.rankslim, report.json, report.md (and model.onnx) into ``out`` by the rules of
    :mod:`rankslim.outputs`: each file atomically, nothing replaced unless every file was written."""
    def onnx(tmp: Path) -> None:
        from .export import export_onnx
        chk = export_onnx(result.model, onnx_shape, tmp)
        result.report.metrics["onnx_max_abs_diff"] = chk.max_abs_diff

    writers = {"model.rankslim": lambda tmp: io.save(result.model, tmp)}
    if onnx_shape is not None:
        writers["model.onnx"] = onnx  # before the reports, which record its check
    writers["report.json"] = lambda tmp: result.report.save_json(tmp)
    writers["report.md"] = lambda tmp: tmp.write_text(result.report.to_markdown(), encoding="utf-8")
    return write_outputs(out, writers, force=force)


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help="model spec (default: the bundled reference ResNet)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape, e.g. 3,224,224"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="directory for energy.png (default: rankslim-out/<model>-inspect)"),
    force: bool = typer.Option(False, "--force", help="write energy.png into a non-empty directory rankslim did "
                                                      "not write (nothing else there is touched)"),
) -> None:
    """Per-layer table (shape, params, MACs, ranks at 90/99% energy) and a PNG of singular-value energy curves."""
    from .inspect import inspect_model, plot_energy
    from .zoo import resolve_model

    with cli_errors():
        model = model or DEFAULT_MODEL
        out = out if out is not None else default_output_dir(model, "inspect", {}, root=DEFAULT_ROOT)
        check_output_dir(out, ["energy.png"], force)
        spec = resolve_model(model, input_shape=_shape(input_shape))
        info = inspect_model(spec.model, _require_shape(spec))
        from rich.table import Table
        t = Table(title=f"{spec.spec or 'model'} at input {spec.input_shape}")
        for h in ("layer", "type", "weight", "params", "MACs", "full rank", "r@90%", "r@99%"):
            t.add_column(h, justify="left" if h in ("layer", "type", "weight") else "right")
        for r in info.layers:
            t.add_row(r.name, r.type, r.shape, f"{r.params:,}", f"{r.macs:,}", str(r.full_rank),
                      str(r.rank_at[0.9]), str(r.rank_at[0.99]))
        console.print(t)
        console.print(f"model: {info.total.params:,} params, {info.total.macs:,} MACs/sample")
        for s in info.skipped:
            console.print(f"[yellow]not compressible[/] {s.name} ({s.type}): {s.reason}")
        write_outputs(out, {"energy.png": lambda tmp: plot_energy(info, tmp)}, force=force)
        console.print(f"[green]wrote[/] {out / 'energy.png'}")


@app.command()
def methods() -> None:
    """List the decomposition methods and rank allocators with their options (-M key=value, -A key=value)."""
    from rich.markup import escape

    from . import ALLOCATORS, METHODS
    console.print("[bold underline]methods[/] (--method NAME; options: -M key=value, or -M NAME.key=value "
                  "for a method chosen with --methods)")
    for name, m in sorted(METHODS.items()):
        console.print(f"[bold]{name}[/]: {escape(m.description)}{' (needs --data)' if m.needs_data else ''}")
        for line in m.option_help():
            console.print(f"    {escape(line)}")
    budgets = {"required": "needs --params/--macs", "none": "budget-free rule", "own": "its own value"}
    console.print("\n[bold underline]allocators[/] (--allocator NAME; options: -A key=value)")
    for name, a in sorted(ALLOCATORS.items()):
        console.print(f"[bold]{name}[/]: {escape(a.description)} ({budgets[a.budget]})")
        for line in a.option_help():
            console.print(f"    {escape(line)}")


from .cli_train import register as _register_train  # noqa: E402  (adds `finetune` and `train`)
_register_train(app)
from .cli_bench import register as _register_bench  # noqa: E402  (adds `bench` and `export`)
_register_bench(app)
from .cli_stream import register as _register_stream  # noqa: E402  (adds `compress-streamed`)
_register_stream(app)


def main() -> None:
    """Entry point of the ``rankslim`` console script."""
    app()


if __name__ == "__main__":
    main()
