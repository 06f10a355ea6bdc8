"""The ``rankslim`` command line: a thin shell over :func:`rankslim.compress` and friends."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import RankslimError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained PyTorch networks smaller and faster by low-rank and sparse decomposition.")
# rich falls back to 80 columns when not on a terminal, which truncates the per-layer table in logs
console = Console() if sys.stdout.isatty() else Console(width=180)
err_console = Console(stderr=True)

#: the main job on bundled defaults: the reference ResNet on Fashion-MNIST at half the MACs
DEFAULT_MODEL = "zoo:resnet20"
DEFAULT_MACS = 0.5


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise RankslimError(f"--input-shape must look like 3,224,224, got {text!r}") from None


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
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


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
    data: Optional[str] = typer.Option(None, "--data", help="fashion-mnist | mnist | digits (calibration + accuracy)"),
    out: Path = typer.Option(Path("rankslim-out"), "--out", "-o", help="output directory"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape, e.g. 3,224,224"),
    include: list[str] = typer.Option([], "--include", help="only layers matching this glob (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="skip layers matching this glob (repeatable)"),
    min_params: int = typer.Option(0, "--min-params", help="skip layers with fewer weights"),
    keep_stem: bool = typer.Option(False, "--keep-stem", help="leave convs with <= 3 input channels dense"),
    round_to: int = typer.Option(1, "--round-to", help="round ranks up to a multiple of this"),
    calib_samples: int = typer.Option(256, "--calib-samples", help="calibration samples for data-aware methods"),
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
) -> None:
    """Compress MODEL and write the compressed model, report.json and report.md to --out.

    With no MODEL: the reference ResNet-20 on Fashion-MNIST at --macs 0.5, with --bn-recalibrate --keep-stem.
    """
    from . import api, io
    from .data import evaluate_accuracy, load_dataset
    from .zoo import resolve_model

    try:
        if model is None:
            # the bundled main job: reference ResNet-20, half the MACs, stem kept dense, BatchNorm re-estimated
            # (see docs/results/svd_baseline.md for what each of these is worth)
            model = DEFAULT_MODEL
            if all(v is None for v in (params, macs, ratio, energy)):
                macs = DEFAULT_MACS
            bn_recalibrate = keep_stem = True
        spec = resolve_model(model, input_shape=_shape(input_shape))
        dataset = data or spec.dataset
        result = api.compress(
            spec.model, method, params=params, macs=macs, ratio=ratio, energy=energy, allocator=allocator,
            input_shape=spec.input_shape, include=include or None, exclude=exclude or None,
            min_params=min_params, keep_stem=keep_stem, round_to=round_to, data=dataset, calib_samples=calib_samples,
            sequential=sequential, seed=seed, bn_recalibrate=bn_recalibrate, progress=console.is_terminal,
            method_options=_options(method_option, "--method-option"),
            allocator_options=_options(allocator_option, "--allocator-option"))
        result.plan.model_spec = spec.spec
        if dataset is not None:
            test_set = load_dataset(dataset, "test")
            with console.status(f"evaluating on {dataset} test split..."):
                before = evaluate_accuracy(spec.model, test_set, max_samples=eval_samples)
                after = evaluate_accuracy(result.model, test_set, max_samples=eval_samples)
            result.report.metrics.update({"dataset": dataset, "accuracy_before": before, "accuracy_after": after})
        console.print(result.report.rich_table())
        for line in result.report.totals_lines():
            console.print(line)
        for s in result.report.skipped:
            console.print(f"[yellow]skipped[/] {s['name']} ({s['type']}): {s['reason']}")
        _write_outputs(result, out, io, onnx_shape=spec.input_shape if onnx else None)
        console.print(f"[green]wrote[/] {out}/model.rankslim, report.json, report.md{', model.onnx' if onnx else ''}")
    except RankslimError as exc:
        _fail(exc)


def _write_outputs(result, out: Path, io, onnx_shape: Optional[tuple[int, ...]] = None) -> None:
    """Write everything into a temporary sibling directory, then move it into place (never half-written)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        io.save(result.model, tmp / "model.rankslim")
        result.report.save_json(tmp / "report.json")
        if onnx_shape is not None:
            from .export import export_onnx
            chk = export_onnx(result.model, onnx_shape, tmp / "model.onnx")
            result.report.metrics["onnx_max_abs_diff"] = chk.max_abs_diff
            result.report.save_json(tmp / "report.json")
        (tmp / "report.md").write_text(result.report.to_markdown())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help="model spec (default: the bundled reference ResNet)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape, e.g. 3,224,224"),
    out: Path = typer.Option(Path("rankslim-out"), "--out", "-o", help="where to write energy.png"),
) -> None:
    """Per-layer table (shape, params, MACs, ranks at 90/99% energy) and a PNG of singular-value energy curves."""
    from .inspect import inspect_model, plot_energy
    from .zoo import resolve_model

    try:
        spec = resolve_model(model or DEFAULT_MODEL, input_shape=_shape(input_shape))
        info = inspect_model(spec.model, spec.input_shape)
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
        out.mkdir(parents=True, exist_ok=True)
        png = plot_energy(info, out / "energy.png")
        console.print(f"[green]wrote[/] {png}")
    except RankslimError as exc:
        _fail(exc)


@app.command()
def methods() -> None:
    """List the decomposition methods and rank allocators."""
    from . import ALLOCATORS, METHODS
    for name, m in sorted(METHODS.items()):
        console.print(f"[bold]{name}[/]: {m.description}{' (needs --data)' if m.needs_data else ''}")
    console.print("allocators: " + ", ".join(sorted(ALLOCATORS)))


from .cli_train import register as _register_train  # noqa: E402  (adds `finetune` and `train`)
_register_train(app)


def main() -> None:
    """Entry point of the ``rankslim`` console script."""
    app()


if __name__ == "__main__":
    main()
