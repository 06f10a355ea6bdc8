"""``rankslim compress-streamed``: a thin shell over :func:`rankslim.stream.compress_streamed`.

Compresses a model bigger than memory block by block from its safetensors checkpoint and writes a streamed
output directory (``rankslim.stream.load_streamed`` reads it back).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from .errors import RankslimError


def compress_streamed_cmd(
    checkpoint: Path = typer.Argument(..., help="a .safetensors file or a directory of them (Hugging Face shards), "
                                                "keyed by the model's state_dict names"),
    model: Optional[str] = typer.Option(None, "--model", help="the model definition: a transformers config.json (or "
                                        "its directory), or package.module:function / file.py:function building the "
                                        "model (called with its parameters on the meta device). Default: the "
                                        "config.json beside CHECKPOINT"),
    data: str = typer.Option(..., "--data", help="calibration token ids (N, T): a .pt/.npy file, or "
                                                 "package.module:function returning them (or a Dataset/DataLoader)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (new, empty, or an earlier streamed output)"),
    method: str = typer.Option("svd", "--method", "-m", help="decomposition method (see `rankslim methods`)"),
    params: Optional[float] = typer.Option(None, "--params", help="keep this fraction of EACH block's Linear/Conv "
                                                                  "parameters"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="rank / full rank for every layer"),
    energy: Optional[float] = typer.Option(None, "--energy", help="keep this fraction of squared singular values"),
    ranks: list[str] = typer.Option([], "--ranks", help="explicit ranks: one integer, or glob=rank items over full "
                                                        "layer names ('model.layers.*.mlp.*=64'; repeatable)"),
    allocator: Optional[str] = typer.Option(None, "--allocator", "-a", help="rank allocator inside each block "
                                                                            "(default cptv)"),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="path of the ModuleList of blocks, e.g. model.layers "
                                                                "(default: the ModuleList with the most parameters)"),
    include: list[str] = typer.Option([], "--include", help="only layers matching this glob (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="skip layers matching this glob (repeatable)"),
    calib_samples: int = typer.Option(256, "--calib-samples", help="calibration sequences"),
    sequential: bool = typer.Option(True, "--sequential/--independent",
                                    help="data-aware methods see inputs from the already-compressed layers and blocks"),
    seed: int = typer.Option(0, "--seed"),
    method_option: list[str] = typer.Option([], "--method-option", "-M", help="method option key=value, repeatable"),
    allocator_option: list[str] = typer.Option([], "--allocator-option", "-A",
                                               help="allocator option key=value, repeatable"),
    compact_heap: bool = typer.Option(True, "--compact-heap/--no-compact-heap",
                                      help="fix glibc's malloc thresholds for this run so that freed temporaries do not "
                                           "fragment the heap and raise the peak block after block"),
) -> None:
    """Compress a model bigger than memory one block at a time from its safetensors CHECKPOINT (budgets per block)."""
    from .cli import _options, _ranks, cli_errors, console
    from .inputs import load_user_object
    from .stream import compress_streamed, model_builder

    with cli_errors():
        if model is None:
            beside = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
            if not beside.is_file():
                raise RankslimError(f"no config.json beside {checkpoint}: pass --model (a transformers config.json or "
                                    "package.module:function)")
            model = str(beside)
        build = model_builder(model)
        tokens = load_user_object(data, "--data")
        result = compress_streamed(
            build, checkpoint, out, data=tokens, method=method, blocks=blocks, params=params, ratio=ratio,
            energy=energy, ranks=_ranks(ranks), allocator=allocator, include=include or None,
            exclude=exclude or None, calib_samples=calib_samples, sequential=sequential, seed=seed,
            method_options=_options(method_option, "--method-option"),
            allocator_options=_options(allocator_option, "--allocator-option"),
            progress=lambda line: console.print(Text(line)), compact_heap=compact_heap)
        before = sum(b.target_params_before for b in result.blocks)
        after = sum(b.target_params_after for b in result.blocks)
        console.print(f"{len(result.blocks)} blocks of {result.blocks_path}: {after:,} of {before:,} target parameters "
                      f"kept ({100 * after / max(before, 1):.1f}%); model {result.params_after:,} of "
                      f"{result.params_before:,} ({100 * result.params_after / max(result.params_before, 1):.1f}%)")
        console.print(f"hidden-state error after the last block: {result.blocks[-1].hidden_rel_error:.4f}; peak RSS "
                      f"{result.peak_rss_bytes / 2**20:,.0f} MiB for a {result.checkpoint_bytes / 2**20:,.0f} MiB "
                      f"checkpoint; {result.seconds['total']:.1f}s")
        for note in result.notes:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"[green]wrote[/] {result.out} (load it with rankslim.stream.load_streamed)")


def register(app: typer.Typer) -> None:
    """Add ``compress-streamed`` to the ``rankslim`` command line."""
    app.command("compress-streamed")(compress_streamed_cmd)
