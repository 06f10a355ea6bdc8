"""ONNX export of a (compressed) model, checked against onnxruntime, with optional int8 dynamic quantization.

Every factorized layer (``rankslim.layers``: low-rank, spatial, Tucker, CP, TT, sparse, L + S) exports with
the TorchScript exporter as plain ``Conv``/``Gemm``/``MatMul``/``Einsum`` nodes; sparse layers export as the
dense masked op their PyTorch forward runs (``weight ⊙ mask``, folded to a constant).  The batch dimension
stays dynamic and is checked at two batch sizes.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, RankslimError


@dataclass
class ExportCheck:
    """Result of :func:`export_onnx`: the file, its size in bytes and the max |torch - onnxruntime| difference
    (over the checked batch sizes; ``nan`` when not checked)."""

    path: Path
    bytes: int
    max_abs_diff: float


def _ort_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, inputs: list[torch.Tensor]) -> float:
    """Largest ``|model(x) - onnxruntime(x)|`` over ``inputs`` (first output only), in the output's units."""
    sess = _ort_session(path)
    name = sess.get_inputs()[0].name
    worst = 0.0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
                ref = model(x)
                ref = ref[0] if isinstance(ref, (tuple, list)) else ref
                worst = max(worst, float((got.to(ref.dtype) - ref).abs().max()))
    finally:
        model.train(was)
    return worst


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, batch: int = 2,
                opset: int = 17, check: bool = True, atol: float = 1e-4) -> ExportCheck:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch dimension and, when ``check``, run the file
    with onnxruntime on random inputs of shapes ``(batch, *input_shape)`` and ``(batch + 1, *input_shape)``
    and compare with PyTorch.

    Raises :class:`RankslimError` when the export fails or the outputs differ by more than ``atol`` (relative
    to the output's largest magnitude when that exceeds 1).  The model is left in its training mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=gen)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated but needs no extra dependency (onnxscript)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
        x2 = torch.randn(batch + 1, *input_shape, generator=gen)
        try:
            diff = onnx_max_abs_diff(model, path, [x, x2])
        except Exception as exc:  # onnxruntime refusing the graph, or a batch size baked into it
            raise RankslimError(f"onnxruntime cannot run the exported file {path}: {exc}") from exc
        scale = max(1.0, float(expected.abs().max()))
        if not diff <= atol * scale:
            raise RankslimError(f"onnxruntime output differs from PyTorch by {diff:.3g} (> {atol * scale:g}); "
                                "the exported file is not trustworthy")
    return ExportCheck(path, path.stat().st_size, diff)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Int8 dynamic quantization of the ONNX file ``src`` into ``dst`` (onnxruntime ``quantize_dynamic``:
    int8 weights for MatMul/Gemm/Conv, activations quantized per call).  Written to a temporary name and renamed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    try:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process goes to the root logger, not to our users
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise RankslimError(f"int8 quantization of {src} failed: {exc}") from exc
    os.replace(tmp, dst)
    return dst


@dataclass
class ExportResult:
    """What :func:`export_file` wrote and measured.

    ``onnx``: the fp32 export (size in bytes, max |diff| to PyTorch); ``int8``: the quantized file's
    path, bytes and max |diff| to PyTorch (``None`` without ``--int8``); ``latency``: ONNX Runtime
    median milliseconds per batch of the fp32 and int8 files (``None`` when not measured).
    """

    onnx: ExportCheck
    int8_path: Path | None = None
    int8_bytes: int | None = None
    int8_max_abs_diff: float | None = None
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        d = asdict(self)
        d["onnx"] = {"path": str(self.onnx.path), "bytes": self.onnx.bytes, "max_abs_diff": self.onnx.max_abs_diff}
        d["int8_path"] = str(self.int8_path) if self.int8_path else None
        return d


def export_file(path: str | os.PathLike, onnx_out: str | os.PathLike, *, int8: bool = False,
                model: nn.Module | str | None = None, input_shape: tuple[int, ...] | None = None,
                measure: bool = True, threads: int = 1, batch: int = 1, repeats: int = 20) -> ExportResult:
    """Export the compressed model in the ``.rankslim`` file ``path`` to ``onnx_out`` (checked in onnxruntime).

    ``int8`` also writes ``<onnx_out stem>.int8.onnx`` (dynamic quantization) and reports its size and its max
    |difference| to the fp32 PyTorch model.  ``measure`` times both files in ONNX Runtime
    (:func:`rankslim.bench.measure_onnx`, ``batch`` inputs, ``threads`` intra-op threads; median ms).
    ``model``: the original definition for files made from user models; ``input_shape``: per-sample shape
    when the plan does not record one.
    """
    from . import io

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such file: {p} (give a .rankslim file written by `rankslim compress`)")
    plan = io.read_plan(p)
    shape = tuple(input_shape or plan.input_shape or ())
    if not shape:
        raise RankslimError(f"{p} records no input shape: pass --input-shape, e.g. 3,224,224")
    net = io.load(p, model=model)
    out = Path(onnx_out)
    tmp = out.with_name(out.name + ".tmp.onnx")
    try:
        chk = export_onnx(net, shape, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)  # only a checked file takes the name
    res = ExportResult(ExportCheck(out, chk.bytes, chk.max_abs_diff))
    files = {"fp32": out}
    if int8:
        q = quantize_int8(out, out.with_name(out.stem + ".int8.onnx"))
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(2, *shape, generator=gen)]
        res.int8_path, res.int8_bytes = q, q.stat().st_size
        res.int8_max_abs_diff = onnx_max_abs_diff(net, q, xs)
        files["int8"] = q
    if measure:
        from .bench import measure_onnx
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(2))
        res.latency = {k: measure_onnx(f, x, threads=threads, repeats=repeats).to_dict() for k, f in files.items()}
    return res


__all__ = ["ExportCheck", "ExportResult", "export_file", "export_onnx", "onnx_max_abs_diff", "quantize_int8"]
