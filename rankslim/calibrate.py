"""Calibration: streaming input/output statistics of one layer, for data-aware methods.

For a target layer with matrix view ``W: (m, k)`` (``k = C·kh·kw`` for convs, the im2col view)
every output position of every calibration sample gives one column pair

* ``x: (k,)`` — the layer's input patch (im2col column for convs, the input vector for Linear);
* ``y = W x: (m,)`` — the ORIGINAL layer's pre-bias response on the ORIGINAL model's input
  (eq. 1 of GreBdec: the targets every data-aware method reproduces).

:class:`Calibrator` accumulates, in float64, the running sums
``XX = Σ x xᵀ (k×k)``, ``YX = Σ y xᵀ (m×k)``, ``x_sum``, ``y_sum``, ``yy = Σ‖y‖²`` (and optionally
``YY = Σ y yᵀ``) and the column count ``n``, so memory never grows with ``n``.  Methods that need
per-sample columns (DDLR, ReLU-ADMM set ``needs_raw = True``) additionally get a seeded, uniform
subsample of at most ``raw_columns`` columns ``X: (k, n_raw)`` and ``Y: (m, n_raw)``.

**Sequential (asymmetric) mode** (default): ``x`` is read from ``work_model``, in which
:func:`rankslim.compress` has already swapped the earlier layers for their compressed versions,
while ``y`` still comes from the original model — so each layer learns to undo the error of the
layers before it (Zhang et al.'s asymmetric reconstruction).  **Independent mode**: both from the
original model.

One forward pass of the original model over all batches caches the inputs of the layers asked for
(``names``), when they fit in ``cache_limit_bytes``; otherwise the original model is kept (a deep
copy, so in-place compression cannot alter it) and re-run for every target.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, UnsupportedLayerError
from .surgery import Target

#: bytes of float64 working columns processed at once (chunking keeps big convs in memory)
CHUNK_BYTES = 64 * 2**20


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the target's inputs are captured."""


@dataclass
class LayerStats:
    """Calibration statistics of one target (all tensors float64, on the layer's device).

    ``XX: (k, k)`` = Σ x xᵀ, ``YX: (m, k)`` = Σ y xᵀ, ``x_sum: (k,)``, ``y_sum: (m,)``,
    ``yy`` = Σ ‖y‖² (float), ``YY: (m, m)`` or ``None``, ``n`` columns (samples × positions).
    ``X: (k, n_raw)`` / ``Y: (m, n_raw)``: raw column subsample (``None`` unless asked for).
    ``memory_bytes``: bytes held by these statistics; ``work_bytes``: peak float64 working
    buffer used while accumulating.  ``sequential`` says where ``x`` came from.
    Sums are uncentred and unnormalised: divide by ``n`` for second moments.
    """

    name: str
    kind: str
    XX: torch.Tensor
    YX: torch.Tensor
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    yy: float
    n: int
    sequential: bool
    YY: torch.Tensor | None = None
    X: torch.Tensor | None = None
    Y: torch.Tensor | None = None
    memory_bytes: int = 0
    work_bytes: int = 0
    positions_per_sample: int = 0
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, k)``: output and input dimensions of the layer's matrix view."""
        return int(self.YX.shape[0]), int(self.YX.shape[1])

    def residual(self, W_hat: torch.Tensor) -> float:
        """``‖Y − Ŵ X‖_F²`` over all calibration columns, from the sums alone. ``W_hat: (m, k)``."""
        W = W_hat.to(self.XX)
        return float(self.yy - 2.0 * (W * self.YX).sum() + ((W @ self.XX) * W).sum())

    def relative_error(self, W_hat: torch.Tensor) -> float:
        """``‖Y − Ŵ X‖_F² / ‖Y‖_F²`` (0 = perfect reconstruction of the original responses)."""
        return self.residual(W_hat) / max(self.yy, 1e-300)


def conv_padding(conv: nn.Conv2d) -> tuple[list[int], str]:
    """``(pad, mode)`` for ``F.pad`` that reproduces ``conv``'s padding (ints, 'same', 'valid', any padding_mode)."""
    pad = getattr(conv, "_reversed_padding_repeated_twice", None)
    if pad is None:  # very old torch: compute it for integer padding
        if isinstance(conv.padding, str):
            raise UnsupportedLayerError(f"string padding {conv.padding!r} needs a newer torch")
        ph, pw = conv.padding
        pad = [pw, pw, ph, ph]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise UnsupportedLayerError(f"padding_mode {conv.padding_mode!r} is not supported by calibration")
    return [int(p) for p in pad], mode


def im2col(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The im2col columns of ``conv`` on input ``x: (N, C, H, W)``: ``(N, C·kh·kw, L)``, ``L = H_out·W_out``.

    Column ``l`` of sample ``i`` is the patch that ``conv`` multiplies by its weight matrix
    ``W.reshape(out, -1)`` at output position ``l`` (row-major), for every stride, padding
    (including 'same' and non-zero padding modes) and dilation; ``groups`` must be 1.
    """
    if conv.groups != 1:
        raise UnsupportedLayerError("im2col statistics need an ungrouped conv (groups == 1)")
    pad, mode = conv_padding(conv)
    if any(pad):
        x = F.pad(x, pad, mode=mode) if mode != "constant" else F.pad(x, pad)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)


def layer_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input columns of ``module`` (Conv2d or Linear) for a batch input ``x``: ``(N, k, L)``.

    Convs: :func:`im2col`; Linear on ``(N, ..., in)``: every leading position is a column.
    """
    if isinstance(module, nn.Conv2d):
        return im2col(module, x)
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    raise UnsupportedLayerError(f"calibration handles Conv2d and Linear layers, not {type(module).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _capture(model: nn.Module, name: str, x: torch.Tensor, calls: int | None) -> list[torch.Tensor]:
    """Inputs of submodule ``name`` during ``model(x)`` (eval, no grad); stops after ``calls`` calls."""
    got: list[torch.Tensor] = []
    mod = model.get_submodule(name)

    def hook(_m, args):
        got.append(args[0].detach().clone())
        if calls is not None and len(got) >= calls:
            raise _Stop

    h = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got


class Calibrator:
    """Streams calibration statistics for data-aware methods (see the module docstring).

    Args:
        original_model: the uncompressed model (never modified; a deep copy is kept when its layer
            inputs cannot be cached).
        batches: model inputs, e.g. from :func:`rankslim.data.calibration_batches`.
        sequential: ``x`` from the partially compressed work model (True) or from the original.
        max_positions: at most this many output positions per sample (seeded uniform choice per
            sample), ``None`` = all.  The same positions are used for ``x`` and ``y``.
        raw_columns: cap on raw columns returned when ``stats_for(..., raw=True)``.
        names: layers whose inputs the one-pass cache keeps (default: every Conv2d/Linear).
        cache_limit_bytes: maximum size of that cache; above it each target re-runs the original.
        full_yy: also accumulate ``YY = Σ y yᵀ`` (m×m).
        seed: seed of position and raw-column sampling.
    """

    def __init__(self, original_model: nn.Module, batches: list[torch.Tensor], sequential: bool = True,
                 max_positions: int | None = None, raw_columns: int = 4096, *,
                 names: Iterable[str] | None = None, cache_limit_bytes: int = 2**30, full_yy: bool = False,
                 seed: int = 0) -> None:
        batches = [b for b in batches]
        if not batches or any(not isinstance(b, torch.Tensor) for b in batches):
            raise DataError("calibration needs a non-empty list of input tensors")
        if any(b.shape[0] == 0 for b in batches):
            raise DataError("calibration batches must not be empty")
        if max_positions is not None and max_positions < 1:
            raise DataError(f"max_positions must be >= 1 or None, got {max_positions}")
        if raw_columns < 1:
            raise DataError(f"raw_columns must be >= 1, got {raw_columns}")
        self.sequential = bool(sequential)
        self.max_positions = max_positions
        self.raw_columns = int(raw_columns)
        self.full_yy = full_yy
        self.seed = int(seed)
        self.device = _device_of(original_model)
        from .data import to_model_dtype  # the datasets give float32; float64/half models need their own dtype
        self.batches = [b.to(self.device) for b in to_model_dtype(batches, original_model)]
        self.n_samples = sum(int(b.shape[0]) for b in self.batches)
        self.cache: dict[str, list[list[torch.Tensor]]] | None = None
        self.cache_bytes = 0
        self._original: nn.Module | None = None
        self._calls: dict[str, int] = {}
        self._fill_cache(original_model, None if names is None else list(names), cache_limit_bytes)

    # ----------------------------------------------------------------------------- original pass

    def _fill_cache(self, model: nn.Module, names: list[str] | None, limit: int) -> None:
        """One pass of the original model storing the inputs of the named layers (per batch, per call)."""
        mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                and (names is None or n in names)}
        cache: dict[str, list[list[torch.Tensor]]] = {n: [] for n in mods}
        state = {"bytes": 0, "over": False}

        def hook(name):
            def fn(_m, args):
                if state["over"]:
                    return
                x = args[0].detach().clone()  # later in-place ops must not alter the cached input
                state["bytes"] += x.numel() * x.element_size()
                if state["bytes"] > limit:
                    state["over"] = True
                    cache.clear()
                    return
                cache[name][-1].append(x)
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for b in self.batches:
                    for n in list(cache):
                        cache[n].append([])
                    model(b)
                    if state["over"]:
                        break
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        if state["over"]:
            # too big to cache: keep a private copy so in-place compression of `model` cannot change it
            self._original = copy.deepcopy(model).eval()
            self.cache = None
        else:
            self.cache = cache
            self.cache_bytes = state["bytes"]
            self._calls = {n: len(v[0]) for n, v in cache.items() if v}

    def _original_inputs(self, name: str, i: int) -> list[torch.Tensor]:
        if self.cache is not None:
            if name not in self.cache:
                raise DataError(f"layer {name!r} was not cached by this Calibrator (pass it in names=...)")
            return self.cache[name][i]
        assert self._original is not None
        return _capture(self._original, name, self.batches[i], self._calls.get(name))

    def _work_inputs(self, work_model: nn.Module, name: str, i: int) -> list[torch.Tensor]:
        was = work_model.training
        work_model.eval()
        try:
            return _capture(work_model, name, self.batches[i], self._calls.get(name))
        finally:
            work_model.train(was)

    # ----------------------------------------------------------------------------- statistics

    def stats_for(self, target: Target, work_model: nn.Module | None = None, raw: bool = False,
                  sequential: bool | None = None) -> LayerStats:
        """Statistics of ``target`` (its ``module`` must still be the ORIGINAL layer).

        ``work_model`` (needed in sequential mode) is the model being compressed, where layers
        before ``target`` may already be replaced; ``raw=True`` also returns raw columns;
        ``sequential=False`` forces original-model inputs for this call (allocation spectra use it).
        """
        seq = self.sequential if sequential is None else bool(sequential)
        module = target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UnsupportedLayerError(f"{target.name}: calibration handles Conv2d/Linear, not {type(module).__name__}")
        if seq and work_model is None:
            raise DataError("sequential calibration needs work_model (the partially compressed model)")
        W = target.matrix.to(self.device, torch.float64)
        m, k = W.shape
        f64 = dict(dtype=torch.float64, device=self.device)
        XX = torch.zeros(k, k, **f64)
        YX = torch.zeros(m, k, **f64)
        YY = torch.zeros(m, m, **f64) if self.full_yy else None
        x_sum = torch.zeros(k, **f64)
        y_sum = torch.zeros(m, **f64)
        yy = 0.0
        n = 0
        work_bytes = 0
        pos_gen = torch.Generator().manual_seed(self.seed)
        raw_gen = torch.Generator().manual_seed(self.seed + 1)
        raw_keys = torch.zeros(0, dtype=torch.float64)
        raw_X = torch.zeros(k, 0, dtype=torch.float64)
        raw_Y = torch.zeros(m, 0, dtype=torch.float64)
        positions = 0
        for i in range(len(self.batches)):
            xo_list = self._original_inputs(target.name, i)
            if not xo_list:
                raise DataError(f"layer {target.name!r} is not called in the forward pass")
            xw_list = self._work_inputs(work_model, target.name, i) if seq else xo_list
            if len(xw_list) != len(xo_list):
                raise DataError(f"layer {target.name!r} is called {len(xw_list)} times in the work model but "
                                f"{len(xo_list)} times in the original")
            for xo, xw in zip(xo_list, xw_list):
                if xo.shape != xw.shape:
                    raise DataError(f"layer {target.name!r} input shape differs: {tuple(xw.shape)} (work) vs "
                                    f"{tuple(xo.shape)} (original)")
                N = xo.shape[0]
                L = layer_columns(module, xo[:1]).shape[-1]
                keep = L if self.max_positions is None else min(L, self.max_positions)
                positions = keep
                step = max(1, CHUNK_BYTES // max(1, 8 * keep * (k + m) * (2 if seq else 1)))
                for s in range(0, N, step):
                    co = layer_columns(module, xo[s:s + step])          # (b, k, L)
                    cw = layer_columns(module, xw[s:s + step]) if seq else co
                    b = co.shape[0]
                    if keep < L:
                        # the same positions for x (work) and y (original): seeded per sample
                        idx = torch.stack([torch.randperm(L, generator=pos_gen)[:keep] for _ in range(b)])
                        idx = idx.to(self.device).unsqueeze(1).expand(b, k, keep)
                        co = co.gather(2, idx)
                        cw = cw.gather(2, idx) if seq else co
                    Xo = co.transpose(0, 1).reshape(k, -1).to(torch.float64)
                    Xw = cw.transpose(0, 1).reshape(k, -1).to(torch.float64) if seq else Xo
                    Y = W @ Xo                                          # original pre-bias response
                    XX += Xw @ Xw.T
                    YX += Y @ Xw.T
                    if YY is not None:
                        YY += Y @ Y.T
                    x_sum += Xw.sum(1)
                    y_sum += Y.sum(1)
                    yy += float((Y * Y).sum())
                    work_bytes = max(work_bytes, (Xo.numel() + Xw.numel() * seq + Y.numel()) * 8)
                    if raw:
                        # bottom-k sampling: a seeded random key per column, keep the smallest keys,
                        # which is a uniform sample without replacement over all columns seen
                        keys = torch.rand(Xw.shape[1], generator=raw_gen, dtype=torch.float64)
                        raw_keys, raw_X, raw_Y = self._keep_smallest(
                            torch.cat([raw_keys, keys]), torch.cat([raw_X, Xw.cpu()], 1), torch.cat([raw_Y, Y.cpu()], 1))
                    n += Xw.shape[1]
        stats = LayerStats(target.name, target.kind, XX, YX, x_sum, y_sum, yy, n, seq, YY,
                           positions_per_sample=positions,
                           info={"samples": self.n_samples, "max_positions": self.max_positions,
                                 "cache_bytes": self.cache_bytes})
        if raw:
            stats.X, stats.Y = raw_X.to(self.device).contiguous(), raw_Y.to(self.device).contiguous()
        stats.work_bytes = work_bytes
        stats.memory_bytes = sum(t.numel() * 8 for t in (XX, YX, x_sum, y_sum, YY, stats.X, stats.Y)
                                 if t is not None)
        return stats

    def _keep_smallest(self, keys: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> tuple:
        """The ``raw_columns`` columns with the smallest keys, in their original (arrival) order."""
        if keys.numel() <= self.raw_columns:
            return keys, X, Y
        idx = keys.topk(self.raw_columns, largest=False).indices.sort().values
        return keys[idx], X[:, idx], Y[:, idx]


__all__ = ["Calibrator", "LayerStats", "im2col", "layer_columns", "conv_padding"]
