"""Helpers shared by several methods: conv geometry, energy curves, calibration statistics, activations.

One home for what more than one method family needs, so no method module imports another for a helper.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import torch

from ..errors import DataError, RankslimError
from ..surgery import Target
from .base import DecomposeContext


def conv_geometry(target: Target) -> tuple[int, int, int, int, int, int, int, int]:
    """``(N, C, kh, kw, H_in, W_in, H_out, W_out)`` of a conv target (per-sample shapes)."""
    conv = target.module
    N, C = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    H_in, W_in = int(target.in_shape[-2]), int(target.in_shape[-1])
    H_out, W_out = int(target.out_shape[-2]), int(target.out_shape[-1])
    return N, C, kh, kw, H_in, W_in, H_out, W_out


def knob_spectrum(captured: list[float], total_energy: float) -> torch.Tensor:
    """Per-knob importance from a captured-energy curve ``captured[r - 1]`` in ``[0, 1]`` (r = 1..max).

    Value ``r`` is ``sqrt((E(r) - E(r-1)) * total_energy)`` (clipped at 0), sorted descending, so that
    ``sum(values[:r]**2) / sum(values**2)`` follows ``E`` wherever ``E`` is concave.  Float64.
    """
    e = torch.tensor([0.0] + list(captured), dtype=torch.float64).clamp(0.0, 1.0)
    inc = (e[1:] - e[:-1]).clamp_min(0.0)
    return (inc * total_energy).sqrt().sort(descending=True).values


def cum_energy(s: torch.Tensor, length: int) -> list[float]:
    """Captured energy ``sum_{<=k} s^2 / sum s^2`` for k = 1..length (1 beyond the spectrum)."""
    e = s.to(torch.float64) ** 2
    tot = float(e.sum()) or 1.0
    c = (torch.cumsum(e, 0) / tot).tolist()
    return [c[min(k, len(c)) - 1] if c else 1.0 for k in range(1, length + 1)]


def corrected_bias(target: Target, stats: Any, W_hat: torch.Tensor) -> torch.Tensor | None:
    """Bias that removes the mean output error: ``b + (Σy − Ŵ Σx)/n`` (``None`` if the layer has no bias)."""
    if not target.has_bias:
        return None
    b = target.module.bias.detach().to(torch.float64)
    shift = (stats.y_sum - W_hat.to(stats.x_sum) @ stats.x_sum) / stats.n
    return (b + shift.to(b)).to(target.module.bias)


def require_stats(ctx: DecomposeContext, method: str, target: Target) -> Any:
    """The calibration statistics in ``ctx``, or a clear error when a caller decomposed without them."""
    if ctx.stats is None:
        raise RankslimError(f"method {method!r} needs calibration statistics for layer {target.name!r}, but none "
                            "were given (pass data=... to compress; allocators that build candidate models "
                            "without a calibrator cannot use data-aware methods)")
    return ctx.stats


def data_info(stats: Any, W_hat: torch.Tensor) -> dict:
    """Facts about the calibration fit worth reporting (JSON-able)."""
    return {"output_rel_error": round(stats.relative_error(W_hat), 6), "calib_columns": int(stats.n),
            "sequential": bool(stats.sequential)}


def activation_for(name: str, option: Any) -> str:
    """The activation ("relu" | "linear") for layer ``name`` from a string or a ``{glob: act}`` option."""
    if option is None:
        return "relu"
    if isinstance(option, str):
        act = option
    else:
        act = next((v for k, v in dict(option).items() if name == k or fnmatch.fnmatchcase(name, k)), "relu")
    if act not in ("relu", "linear"):
        raise RankslimError(f"activation must be 'relu' or 'linear', got {act!r} for layer {name!r}")
    return act


def raw_columns(target: Target, ctx: DecomposeContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw calibration columns ``X: (k, n)``, ``Y: (m, n)`` (float64) of ``target`` or a clear error."""
    stats = ctx.stats
    if stats is None or getattr(stats, "X", None) is None or getattr(stats, "Y", None) is None:
        raise DataError(f"{method} needs raw calibration columns for {target.name!r}: call compress(..., data=...) "
                        "so the Calibrator collects them (methods with needs_raw = True)")
    X, Y = stats.X.to(torch.float64).cpu(), stats.Y.to(torch.float64).cpu()
    if X.shape[0] != target.matrix_shape[1] or Y.shape[0] != target.matrix_shape[0]:
        raise DataError(f"{method}: calibration columns of {target.name!r} have shapes {tuple(X.shape)} / "
                        f"{tuple(Y.shape)}, expected ({target.matrix_shape[1]}, n) / ({target.matrix_shape[0]}, n)")
    return X, Y


def conv_reason(target: Target) -> str | None:
    """Why a conv cannot use the im2col data path (grouped convs), or None."""
    if target.kind == "conv" and getattr(target.module, "groups", 1) != 1:
        return "grouped convolutions have no single im2col matrix (groups != 1)"
    return None


__all__ = ["activation_for", "conv_geometry", "conv_reason", "corrected_bias", "cum_energy", "data_info",
           "knob_spectrum", "raw_columns", "require_stats"]
