"""``rankslim bench`` and ``rankslim export``: thin shells over :mod:`rankslim.bench` and :mod:`rankslim.export`.

``bench`` prints (and with ``--out`` writes ``bench.json`` + ``bench.md``, by the rules of
:mod:`rankslim.outputs`) measured latency of a model, or of a model against its compressed version.
``export`` writes an ONNX file (and its int8 version) checked in onnxruntime; an existing file is replaced only
with ``--force``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import RankslimError

console = Console() if sys.stdout.isatty() else Console(width=180)


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RankslimError(f"{flag} takes comma-separated integers, e.g. 1,32; got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise RankslimError(f"{flag} takes positive integers, e.g. 1,32; got {text!r}")
    return out


def _runtimes(text: str) -> list[str]:
    from .bench import RUNTIMES
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in RUNTIMES]
    if bad or not out:
        raise RankslimError(f"--runtime takes {' and/or '.join(RUNTIMES)} (comma-separated); got {text!r}")
    return out


def bench_cmd(
    model: str = typer.Argument(..., help="the original model: zoo:NAME, torchvision:NAME[@w.pth], file, pkg.mod:fn"),
    compressed: Optional[Path] = typer.Option(None, "--compressed", "-c",
                                              help="a .rankslim file compressed from MODEL (compared with it)"),
    batch: str = typer.Option("1", "--batch", "-b", help="batch sizes, comma-separated, e.g. 1,32"),
    threads: int = typer.Option(1, "--threads", "-t", help="intra-op threads (torch / onnxruntime)"),
    runtime: str = typer.Option("eager", "--runtime", "-r", help="eager and/or onnxruntime, comma-separated"),
    warmup: int = typer.Option(3, "--warmup", help="untimed passes before timing"),
    repeats: int = typer.Option(20, "--repeats", help="timed passes (median and IQR reported)"),
    per_layer: bool = typer.Option(True, "--per-layer/--no-per-layer", help="time each replaced layer (eager)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape, e.g. 3,224,224"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write bench.json and bench.md here"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty directory rankslim did not write"),
) -> None:
    """Measure CPU latency and peak memory of MODEL (and of its --compressed version): speedup and efficiency."""
    from . import io
    from .bench import compare
    from .cli import _require_shape, _shape, cli_errors
    from .outputs import check_output_dir, write_outputs
    from .zoo import resolve_model
    with cli_errors():
        batches, rts = _ints(batch, "--batch"), _runtimes(runtime)
        if threads < 1 or repeats < 1 or warmup < 0:
            raise RankslimError("--threads and --repeats must be >= 1, --warmup >= 0")
        if out is not None:
            check_output_dir(out, ["bench.json", "bench.md"], force)
        spec = resolve_model(model, input_shape=_shape(input_shape))
        shape = _require_shape(spec)
        small = None
        if compressed is not None:
            if not compressed.is_file():
                raise RankslimError(f"no such file: {compressed} (give a .rankslim file written by `rankslim compress`)")
            small = io.load(compressed, model=spec.model)
        res = compare(spec.model.eval(), small, shape, runtimes=rts, batches=batches, threads=threads,
                      warmup=warmup, repeats=repeats, per_layer=per_layer)
        md = res.to_markdown()
        console.print(md, markup=False, highlight=False)
        if out is not None:
            write_outputs(out, {"bench.json": lambda tmp: tmp.write_text(json.dumps(res.to_dict(), indent=2)),
                                "bench.md": lambda tmp: tmp.write_text(md, encoding="utf-8")}, force=force)
            console.print(f"[green]wrote[/] {out}/bench.json, bench.md")


def export_cmd(
    path: Path = typer.Argument(..., help="a compressed model (.rankslim) written by `rankslim compress`"),
    onnx: Path = typer.Option(..., "--onnx", help="the ONNX file to write"),
    int8: bool = typer.Option(False, "--int8", help="also write <name>.int8.onnx (dynamic int8 quantization)"),
    base: Optional[str] = typer.Option(None, "--base", help="model definition for files made from a user model"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="per-sample input shape if not recorded"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="time the files in onnxruntime"),
    threads: int = typer.Option(1, "--threads", "-t", help="onnxruntime intra-op threads for the timing"),
    batch: int = typer.Option(1, "--batch", "-b", help="batch size for the timing"),
    force: bool = typer.Option(False, "--force", help="replace existing ONNX files"),
) -> None:
    """Export a compressed model to ONNX, check it in onnxruntime (max |diff| printed), optionally int8-quantize."""
    from .cli import _shape, cli_errors
    from .export import export_file
    with cli_errors():
        targets = [onnx] + ([onnx.with_name(onnx.stem + ".int8.onnx")] if int8 else [])
        existing = [str(t) for t in targets if t.exists()]
        if existing and not force:
            raise RankslimError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another "
                                "--onnx path")
        if threads < 1 or batch < 1:
            raise RankslimError("--threads and --batch must be >= 1")
        res = export_file(path, onnx, int8=int8, model=base, input_shape=_shape(input_shape), measure=measure,
                          threads=threads, batch=batch)
        console.print(f"[green]wrote[/] {res.onnx.path} ({res.onnx.bytes / 2 ** 20:.2f} MiB), max |torch - onnxruntime|"
                      f" = {res.onnx.max_abs_diff:.3g}")
        if res.int8_path is not None:
            console.print(f"[green]wrote[/] {res.int8_path} ({res.int8_bytes / 2 ** 20:.2f} MiB, "
                          f"{res.int8_bytes / res.onnx.bytes:.2f}x the fp32 size), max |torch fp32 - int8| = "
                          f"{res.int8_max_abs_diff:.3g}")
        for name, lat in (res.latency or {}).items():
            console.print(f"onnxruntime {name}: {lat['median_ms']:.3f} ms per batch of {lat['batch']} "
                          f"(IQR {lat['iqr_ms']:.3f}, {lat['threads']} thread(s))")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` and ``export`` commands to the ``rankslim`` CLI app."""
    app.command("bench")(bench_cmd)
    app.command("export")(export_cmd)


__all__ = ["bench_cmd", "export_cmd", "register"]
