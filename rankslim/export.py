"""ONNX export of a (compressed) model, checked against onnxruntime."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import RankslimError


@dataclass
class ExportCheck:
    """Result of :func:`export_onnx`: the file, its size in bytes and the max |torch - onnxruntime| difference."""

    path: Path
    bytes: int
    max_abs_diff: float


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, batch: int = 2,
                opset: int = 17, check: bool = True, atol: float = 1e-4) -> ExportCheck:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch dimension and, when ``check``, run the file
    with onnxruntime on a random input of shape ``(batch, *input_shape)`` and compare with PyTorch.

    Raises :class:`RankslimError` when the export fails or the outputs differ by more than ``atol``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated but needs no extra dependency (onnxscript)
            warnings.simplefilter("ignore", DeprecationWarning)
            expected = model(x)
            torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    except Exception as exc:
        raise RankslimError(f"ONNX export failed: {exc}") from exc
    finally:
        model.train(was_training)
    diff = float("nan")
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        diff = float((got - expected).abs().max())
        if not diff <= atol * max(1.0, float(expected.abs().max())):
            raise RankslimError(f"onnxruntime output differs from PyTorch by {diff:.3g} (> {atol:g}); "
                                "the exported file is not trustworthy")
    return ExportCheck(path, path.stat().st_size, diff)
