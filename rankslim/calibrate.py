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

Two schemes produce the same statistics (the same float64 sums in the same order):

* ``scheme="fast"`` (default): the model is traced once with :mod:`torch.fx` and interpreted node by
  node.  For every batch a *frontier* — the live values of the graph just before the next target's
  call, in the original model and in the work model — is kept and only moved forward, so calibrating
  every target in forward order costs about one forward pass of each model per batch in total
  (GPTQ/SparseGPT-style "run up to block i once, feed the cached values through the compressed
  block", without needing a block structure).  A frontier is dropped when a module before it
  changes (identity or in-place edit, checked through parameter version counters) or the target
  asked for lies behind it; then that batch restarts from the model input.  Frontiers are held
  only while all of them fit in ``cache_limit_bytes``; a batch whose frontier does not fit is
  recomputed from the input for each target, so memory never grows with the number of samples
  past that bound.  Models fx cannot trace (data-dependent control flow), or whose traced graph
  does not reproduce the eager output, fall back to the per-layer scheme (``scheme_used`` says so).
* ``scheme="per-layer"`` (the original scheme, kept for comparison): one forward pass of the
  original model over all batches caches the inputs of the layers asked for (``names``), when they
  fit in ``cache_limit_bytes`` (otherwise the original model is re-run for every target); in
  sequential mode the work model runs from its input up to the target (stopped there) for every
  target, which is quadratic in depth.

In both schemes the original model is read from a private deep copy (or the cache), so compressing
``original_model`` in place cannot alter the targets ``y``.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .bench import trim_heap
from .cost import is_hf_conv1d
from .errors import DataError, OptionError, UnsupportedLayerError
from .inputs import batch_size, call_model, tensors, to_model
from .surgery import Target

#: bytes of float64 working columns processed at once (chunking keeps big convs in memory)
CHUNK_BYTES = 64 * 2**20

#: calibration schemes (see the module docstring); ``DEFAULT_SCHEME`` is used when none is given
SCHEMES = ("fast", "per-layer")
DEFAULT_SCHEME = "fast"
#: bound on cached activations when a Calibrator is given none (bytes); past it, batches are recomputed
DEFAULT_CACHE_LIMIT = 2**30


def _is_layer(m: nn.Module) -> bool:
    """Layers calibration can target: Conv2d/Linear (subclasses too), Conv1d and GPT-2 Conv1D (seen through views)."""
    return isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d)) or is_hf_conv1d(m)


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
            call_model(model, x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got


def _tree_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors inside ``value`` (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tree_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tree_tensors(v)]
    return []


def _tree_clone(value: Any) -> Any:
    """``value`` with every tensor inside it cloned (containers rebuilt, other leaves shared)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_tree_clone(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_tree_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _tree_clone(v) for k, v in value.items()}
    return value


def _env_bytes(env: dict) -> int:
    """Bytes held by the tensors of a frontier (each storage counted once)."""
    seen: dict[int, int] = {}
    for v in env.values():
        for t in _tree_tensors(v):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _fetch(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for atom in path.split("."):
        obj = getattr(obj, atom)
    return obj


def _versions(obj: Any) -> tuple[int, ...]:
    """Version counters of a module's parameters and buffers (or of a tensor): they move on in-place edits."""
    if isinstance(obj, nn.Module):
        return tuple(t._version for t in obj.parameters()) + tuple(t._version for t in obj.buffers())
    if isinstance(obj, torch.Tensor):
        return (obj._version,)
    return ()


class _LayerTracer(torch.fx.Tracer):
    """fx tracer that keeps every Conv2d/Linear (subclasses included) as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_layer(m) or super().is_leaf_module(m, qualname)


class _NoFast(Exception):
    """The traced graph cannot answer this request: use the per-layer scheme."""


@dataclass
class _Front:
    """Where one batch stands in the graph: ``env`` holds the live values before node ``pos``."""

    pos: int = 0
    env: dict | None = None
    nbytes: int = 0


class _Graph:
    """The fx graph of a model, run node by node on any model with the same module names."""

    def __init__(self, model: nn.Module) -> None:
        graph = _LayerTracer().trace(model)
        self.nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        last = list(range(len(self.nodes)))
        for i, n in enumerate(self.nodes):
            for u in n.users:
                last[i] = max(last[i], index[u])
        # values freed right after the node that uses them last: a frontier keeps only what is still needed
        self.free_after: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            self.free_after[last[i]].append(n)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        # call nodes per module object (aliases of one module share its nodes)
        self.calls: dict[int, list[int]] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.calls.setdefault(id(model.get_submodule(str(n.target))), []).append(i)

    def start(self, batch: torch.Tensor) -> dict:
        """The environment before the first node: placeholders bound (the input cloned: in-place ops may edit it)."""
        env: dict = {}
        for j, n in enumerate(self.placeholders):
            if j == 0:
                env[n] = batch.clone()
            elif n.args:
                env[n] = n.args[0]  # a default value
            else:
                raise _NoFast(f"forward needs more than one input ({n.name})")
        return env

    def run(self, root: nn.Module, env: dict, start: int, stop: int,
            on_fetch: Callable[[int, Any], None] | None = None,
            capture: dict[int, list] | None = None) -> None:
        """Execute nodes ``[start, stop)`` on ``root``'s modules, in place on ``env``.

        ``on_fetch(i, obj)`` sees every module/attribute fetched from ``root``; ``capture[i]`` receives a
        clone of the first input of call node ``i`` before it runs.
        """
        from torch.fx.node import map_arg
        for i in range(max(start, len(self.placeholders)), stop):
            n = self.nodes[i]
            load = lambda a: map_arg(a, lambda x: env[x])  # noqa: E731
            if n.op == "call_module":
                mod = root.get_submodule(str(n.target))
                if on_fetch is not None:
                    on_fetch(i, mod)
                args, kwargs = load(n.args), load(n.kwargs)
                if capture is not None and i in capture:
                    capture[i].append(args[0].detach().clone())
                env[n] = mod(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*load(n.args), **load(n.kwargs))
            elif n.op == "call_method":
                args = load(n.args)
                env[n] = getattr(args[0], str(n.target))(*args[1:], **load(n.kwargs))
            elif n.op == "get_attr":
                obj = _fetch(root, str(n.target))
                if on_fetch is not None:
                    on_fetch(i, obj)
                env[n] = obj
            elif n.op == "output":
                env[n] = load(n.args[0])
            else:
                raise _NoFast(f"unexpected fx node {n.op}")
            for dead in self.free_after[i]:
                env.pop(dead, None)

    def output(self, root: nn.Module, batch: torch.Tensor) -> Any:
        """The model output computed through the graph (used to check the trace)."""
        from torch.fx.node import map_arg
        env = self.start(batch)
        self.run(root, env, 0, len(self.nodes) - 1)  # the output node's inputs stay live: it is never run
        return map_arg(self.nodes[-1].args[0], lambda x: env[x])


class _Accumulator:
    """The streamed sums of one target, fed one call input at a time (batch order, then call order).

    Both schemes feed it in the same order, so their statistics are the same float64 sums.
    """

    def __init__(self, cal: "Calibrator", target: Target, seq: bool, raw: bool) -> None:
        self.cal, self.target, self.seq, self.raw = cal, target, seq, raw
        self.module = target.module
        self.W = target.matrix.to(cal.device, torch.float64)
        m, k = self.W.shape
        self.m, self.k = m, k
        f64 = dict(dtype=torch.float64, device=cal.device)
        self.XX = torch.zeros(k, k, **f64)
        self.YX = torch.zeros(m, k, **f64)
        self.YY = torch.zeros(m, m, **f64) if cal.full_yy else None
        self.x_sum = torch.zeros(k, **f64)
        self.y_sum = torch.zeros(m, **f64)
        self.yy = 0.0
        self.n = 0
        self.work_bytes = 0
        self.pos_gen = torch.Generator().manual_seed(cal.seed)
        self.raw_gen = torch.Generator().manual_seed(cal.seed + 1)
        self.raw_keys = torch.zeros(0, dtype=torch.float64)
        self.raw_X = torch.zeros(k, 0, dtype=torch.float64)
        self.raw_Y = torch.zeros(m, 0, dtype=torch.float64)
        self.positions = 0
        # Gram route (fast scheme): accumulate k x k products of the inputs only and apply W once at the end,
        # YX = W Σ xo xwᵀ, yy = tr(W (Σ xo xoᵀ) Wᵀ), y_sum = W Σ xo.  Independent mode then needs one k²n product
        # instead of k²n + 2mkn; sequential mode needs three, which pays when k < m (expansions).  Raw columns
        # and YY need the responses themselves, so they keep the direct route.
        self.gram = cal.scheme == "fast" and not raw and self.YY is None and (not seq or k < m)
        if self.gram:
            self.XoXw = self.XX if not seq else torch.zeros(k, k, **f64)
            self.XoXo = self.XX if not seq else torch.zeros(k, k, **f64)
            self.xo_sum = self.x_sum if not seq else torch.zeros(k, **f64)

    def add_batch(self, xo_list: list[torch.Tensor], xw_list: list[torch.Tensor]) -> None:
        """One batch: the inputs of every call of the layer, original (``xo``) and work (``xw``)."""
        name = self.target.name
        # layers seen through a view (Conv1d, GPT-2 Conv1D, subclasses): their input as the view takes it
        xo_list, xw_list = [self.target.prepare(x) for x in xo_list], [self.target.prepare(x) for x in xw_list]
        if not xo_list:
            raise DataError(f"layer {name!r} is not called in the forward pass")
        if len(xw_list) != len(xo_list):
            raise DataError(f"layer {name!r} is called {len(xw_list)} times in the work model but "
                            f"{len(xo_list)} times in the original")
        for xo, xw in zip(xo_list, xw_list):
            if xo.shape != xw.shape:
                raise DataError(f"layer {name!r} input shape differs: {tuple(xw.shape)} (work) vs "
                                f"{tuple(xo.shape)} (original)")
            self._add(xo, xw)

    def _add(self, xo: torch.Tensor, xw: torch.Tensor) -> None:
        seq, module, k, m, W = self.seq, self.module, self.k, self.m, self.W
        cal = self.cal
        N = xo.shape[0]
        L = layer_columns(module, xo[:1]).shape[-1]
        keep = L if cal.max_positions is None else min(L, cal.max_positions)
        self.positions = keep
        step = max(1, CHUNK_BYTES // max(1, 8 * keep * (k + m) * (2 if seq else 1)))
        for s in range(0, N, step):
            co = layer_columns(module, xo[s:s + step])          # (b, k, L)
            cw = layer_columns(module, xw[s:s + step]) if seq else co
            b = co.shape[0]
            if keep < L:
                # the same positions for x (work) and y (original): seeded per sample
                idx = torch.stack([torch.randperm(L, generator=self.pos_gen)[:keep] for _ in range(b)])
                idx = idx.to(cal.device).unsqueeze(1).expand(b, k, keep)
                co = co.gather(2, idx)
                cw = cw.gather(2, idx) if seq else co
            Xo = co.transpose(0, 1).reshape(k, -1).to(torch.float64)
            Xw = cw.transpose(0, 1).reshape(k, -1).to(torch.float64) if seq else Xo
            if self.gram:
                self.XX += Xw @ Xw.T
                self.x_sum += Xw.sum(1)
                if seq:
                    self.XoXw += Xo @ Xw.T
                    self.XoXo += Xo @ Xo.T
                    self.xo_sum += Xo.sum(1)
                self.work_bytes = max(self.work_bytes, (Xo.numel() + Xw.numel() * seq) * 8)
                self.n += Xw.shape[1]
                continue
            Y = W @ Xo                                          # original pre-bias response
            self.XX += Xw @ Xw.T
            self.YX += Y @ Xw.T
            if self.YY is not None:
                self.YY += Y @ Y.T
            self.x_sum += Xw.sum(1)
            self.y_sum += Y.sum(1)
            self.yy += float((Y * Y).sum())
            self.work_bytes = max(self.work_bytes, (Xo.numel() + Xw.numel() * seq + Y.numel()) * 8)
            if self.raw:
                # bottom-k sampling: a seeded random key per column, keep the smallest keys,
                # which is a uniform sample without replacement over all columns seen
                keys = torch.rand(Xw.shape[1], generator=self.raw_gen, dtype=torch.float64)
                self.raw_keys, self.raw_X, self.raw_Y = cal._keep_smallest(
                    torch.cat([self.raw_keys, keys]), torch.cat([self.raw_X, Xw.cpu()], 1),
                    torch.cat([self.raw_Y, Y.cpu()], 1))
            self.n += Xw.shape[1]

    def result(self) -> LayerStats:
        cal, t = self.cal, self.target
        if self.gram:
            W = self.W
            self.YX = W @ self.XoXw
            self.yy = float(((W @ self.XoXo) * W).sum())
            self.y_sum = W @ self.xo_sum
            self.gram = False  # the sums are final
        stats = LayerStats(t.name, t.kind, self.XX, self.YX, self.x_sum, self.y_sum, self.yy, self.n, self.seq,
                           self.YY, positions_per_sample=self.positions,
                           info={"samples": cal.n_samples, "max_positions": cal.max_positions,
                                 "cache_bytes": cal.cache_bytes, "scheme": cal.scheme_used})
        if self.raw:
            stats.X, stats.Y = self.raw_X.to(cal.device).contiguous(), self.raw_Y.to(cal.device).contiguous()
        stats.work_bytes = self.work_bytes
        stats.memory_bytes = sum(x.numel() * 8 for x in (stats.XX, stats.YX, stats.x_sum, stats.y_sum, stats.YY,
                                                         stats.X, stats.Y) if x is not None)
        return stats


class Calibrator:
    """Streams calibration statistics for data-aware methods (see the module docstring).

    Args:
        original_model: the uncompressed model (never modified; a private deep copy answers for it
            unless its layer inputs are cached by the per-layer scheme).
        batches: model inputs, e.g. from :func:`rankslim.data.calibration_batches`.
        sequential: ``x`` from the partially compressed work model (True) or from the original.
        max_positions: at most this many output positions per sample (seeded uniform choice per
            sample), ``None`` = all.  The same positions are used for ``x`` and ``y``.
        raw_columns: cap on raw columns returned when ``stats_for(..., raw=True)``.
        names: layers whose inputs the per-layer scheme's one-pass cache keeps (default: every
            Conv2d/Linear); the fast scheme serves every layer.
        cache_limit_bytes: bound on cached activations: the per-layer scheme's input cache, or the fast
            scheme's frontiers (original + work, all batches together).
        full_yy: also accumulate ``YY = Σ y yᵀ`` (m×m).
        seed: seed of position and raw-column sampling.
        scheme: ``"fast"`` or ``"per-layer"`` (``None``: :data:`DEFAULT_SCHEME`); ``scheme_used`` says
            which one answers (the fast scheme falls back to per-layer for untraceable models, with
            the reason in ``fallback_reason``).

    ``nodes_run``: graph nodes executed by the fast scheme, per model (``"original"``, ``"work"``);
    ``restarts``: frontiers that had to start again from the input; ``peak_frontier_bytes``: the most
    bytes the frontiers held at once.
    """

    def __init__(self, original_model: nn.Module, batches: list[torch.Tensor], sequential: bool = True,
                 max_positions: int | None = None, raw_columns: int = 4096, *,
                 names: Iterable[str] | None = None, cache_limit_bytes: int | None = None, full_yy: bool = False,
                 seed: int = 0, scheme: str | None = None) -> None:
        batches = [b for b in batches]
        if not batches or any(not tensors(b) for b in batches):
            raise DataError("calibration needs a non-empty list of model inputs (tensors, tuples or dicts of tensors)")
        if any(batch_size(b) == 0 for b in batches):
            raise DataError("calibration batches must not be empty")
        if max_positions is not None and max_positions < 1:
            raise DataError(f"max_positions must be >= 1 or None, got {max_positions}")
        if raw_columns < 1:
            raise DataError(f"raw_columns must be >= 1, got {raw_columns}")
        scheme = DEFAULT_SCHEME if scheme is None else scheme
        if scheme not in SCHEMES:
            raise OptionError(f"unknown calibration scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        self.sequential = bool(sequential)
        self.max_positions = max_positions
        self.raw_columns = int(raw_columns)
        self.full_yy = full_yy
        self.seed = int(seed)
        self.scheme = scheme
        self.scheme_used = scheme
        self.fallback_reason: str | None = None
        cache_limit_bytes = DEFAULT_CACHE_LIMIT if cache_limit_bytes is None else int(cache_limit_bytes)
        self.cache_limit_bytes = cache_limit_bytes
        self.device = _device_of(original_model)
        # the datasets give float32; float64/half models need their own dtype (token ids keep theirs)
        self.batches = [to_model(b, original_model) for b in batches]
        self.n_samples = sum(batch_size(b) for b in self.batches)
        self.cache: dict[str, list[list[torch.Tensor]]] | None = None
        self.cache_bytes = 0
        self._original: nn.Module | None = None
        self._calls: dict[str, int] = {}
        self._graph: _Graph | None = None
        self.nodes_run = {"original": 0, "work": 0}
        self.restarts = 0
        self.peak_frontier_bytes = 0
        names_list = None if names is None else list(names)
        if scheme == "fast":
            was = original_model.training
            try:
                # a private copy: compressing the model in place must not move the targets y
                self._original = copy.deepcopy(original_model).eval()
            finally:
                original_model.train(was)
            why = self._build_graph()
            if why is None:
                n = len(self.batches)
                self._fronts = {"original": [_Front() for _ in range(n)], "work": [_Front() for _ in range(n)]}
                self._seen: dict[int, tuple[Any, tuple[int, ...]]] = {}  # work-model fetches behind the frontiers
                return
            self.scheme_used, self.fallback_reason = "per-layer", why
            self._fill_cache(self._original, names_list, cache_limit_bytes)
            return
        self._fill_cache(original_model, names_list, cache_limit_bytes)

    # ----------------------------------------------------------------------------- fast scheme

    def _build_graph(self) -> str | None:
        """Trace the private original; ``None`` when the graph reproduces the eager model, else why not."""
        model = self._original
        assert model is not None
        if not isinstance(self.batches[0], torch.Tensor):
            return "the model takes tuple/dict inputs, which the traced graph is not run on"
        try:
            graph = _Graph(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "use the per-layer scheme"
            return f"torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        probe = self.batches[0][:2]
        counts: dict[int, int] = {}
        layers = {id(m): m for m in model.modules() if _is_layer(m)}
        handles = [m.register_forward_pre_hook(lambda mod, _a: counts.__setitem__(id(mod), counts.get(id(mod), 0) + 1))
                   for m in layers.values()]
        try:
            with torch.no_grad():
                eager = model(probe)
        finally:
            for h in handles:
                h.remove()
        try:
            with torch.no_grad():
                traced = graph.output(model, probe)
        except Exception as e:  # noqa: BLE001
            return f"the traced graph does not run ({type(e).__name__})"
        a, b = _tree_tensors(eager), _tree_tensors(traced)
        if len(a) != len(b) or any(x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True)
                                   for x, y in zip(a, b)):
            return "the traced graph does not reproduce the model's output (data-dependent control flow?)"
        for key in layers:
            if counts.get(key, 0) != len(graph.calls.get(key, [])):
                return "a layer is called a different number of times in the traced graph than in the model"
        self._graph = graph
        return None

    def _check_work(self, work_model: nn.Module) -> None:
        """Drop the work frontiers that passed a module or attribute that has changed since."""
        assert self._graph is not None
        stale = None
        for i in sorted(self._seen):
            ref, vers = self._seen[i]
            node = self._graph.nodes[i]
            try:
                now = _fetch(work_model, str(node.target))
            except AttributeError:
                now = None
            obj = ref() if isinstance(ref, weakref.ref) else ref
            if obj is not now or _versions(now) != vers:
                stale = i
                break
        if stale is None:
            return
        for i in [j for j in self._seen if j >= stale]:
            del self._seen[i]
        for f in self._fronts["work"]:
            if f.pos > stale:
                self._drop(f)
                self.restarts += 1

    def _drop(self, f: _Front) -> None:
        f.pos, f.env, f.nbytes = 0, None, 0

    def _record(self, i: int, obj: Any) -> None:
        try:
            ref: Any = weakref.ref(obj)
        except TypeError:
            ref = obj
        self._seen[i] = (ref, _versions(obj))

    def _fast_inputs(self, side: str, root: nn.Module, i: int, calls: list[int]) -> list[torch.Tensor]:
        """Inputs of the calls ``calls`` (node indices) of one layer on batch ``i``, moving that batch's frontier."""
        g = self._graph
        assert g is not None
        f = self._fronts[side][i]
        if f.pos > calls[0]:
            self._drop(f)
            self.restarts += 1
        env = f.env if f.env is not None else g.start(self.batches[i])
        record = self._record if side == "work" else None
        g.run(root, env, f.pos, calls[0], on_fetch=record)
        self.nodes_run[side] += calls[0] - f.pos
        # keep this frontier only while all frontiers fit in the limit: memory stays bounded in the samples
        total = sum(x.nbytes for fs in self._fronts.values() for x in fs) - f.nbytes
        nbytes = _env_bytes(env)
        if total + nbytes <= self.cache_limit_bytes:
            f.pos, f.env, f.nbytes = calls[0], env, nbytes
            self.peak_frontier_bytes = max(self.peak_frontier_bytes, total + nbytes)
        else:
            self._drop(f)
        node = g.nodes[calls[0]]
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            raise _NoFast(f"layer {node.target} is called without a positional input")
        if len(calls) == 1:
            return [env[node.args[0]]]  # used before any later node runs: no copy needed
        # a layer called several times: run a private copy of the frontier to its last call (the layers in
        # between keep their current state, as a full forward of the work model would see them)
        tmp = {k: _tree_clone(v) for k, v in env.items()}
        capture: dict[int, list] = {c: [] for c in calls}
        g.run(root, tmp, calls[0], calls[-1] + 1, on_fetch=None, capture=capture)
        self.nodes_run[side] += calls[-1] + 1 - calls[0]
        return [capture[c][0] for c in calls]

    def _fast_stats(self, acc: _Accumulator, work_model: nn.Module | None, seq: bool) -> None:
        g = self._graph
        assert g is not None and self._original is not None
        calls = g.calls.get(id(self._original.get_submodule(acc.target.name)), [])
        if not calls:
            raise DataError(f"layer {acc.target.name!r} is not called in the forward pass")
        training: list[nn.Module] = []
        if seq:
            assert work_model is not None
            # eval for the passes; exactly the modules that were training are put back (mixed modes survive)
            training = [m for m in work_model.modules() if m.training]
            for m in training:
                m.training = False
            self._check_work(work_model)
        try:
            with torch.no_grad():
                for i in range(len(self.batches)):
                    xo = self._fast_inputs("original", self._original, i, calls)
                    xw = self._fast_inputs("work", work_model, i, calls) if seq else xo
                    acc.add_batch(xo, xw)
                    del xo, xw
            # freed activations of the batches otherwise stay in glibc's heap and the resident peak creeps up
            # with the number of batches (malloc_trim costs ~50 ms: once per target, not per batch)
            trim_heap()
        finally:
            for m in training:
                m.training = True

    # ----------------------------------------------------------------------------- per-layer scheme

    def _fill_cache(self, model: nn.Module, names: list[str] | None, limit: int) -> None:
        """One pass of the original model storing the inputs of the named layers (per batch, per call)."""
        mods = {n: m for n, m in model.named_modules() if _is_layer(m) and (names is None or n in names)}
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
                    call_model(model, b)
                    if state["over"]:
                        break
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        if state["over"]:
            # too big to cache: keep a private copy so in-place compression of `model` cannot change it
            if self._original is None:
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

    def _per_layer_stats(self, acc: _Accumulator, work_model: nn.Module | None, seq: bool) -> None:
        name = acc.target.name
        for i in range(len(self.batches)):
            xo_list = self._original_inputs(name, i)
            xw_list = self._work_inputs(work_model, name, i) if seq else xo_list
            acc.add_batch(xo_list, xw_list)

    # ----------------------------------------------------------------------------- statistics

    def stats_for(self, target: Target, work_model: nn.Module | None = None, raw: bool = False,
                  sequential: bool | None = None) -> LayerStats:
        """Statistics of ``target`` (its ``module`` must still be the ORIGINAL layer).

        ``work_model`` (needed in sequential mode) is the model being compressed, where layers
        before ``target`` may already be replaced; ``raw=True`` also returns raw columns;
        ``sequential=False`` forces original-model inputs for this call (allocation spectra use it).
        Calling it for the targets in forward order is what keeps the fast scheme linear in depth.
        """
        seq = self.sequential if sequential is None else bool(sequential)
        module = target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise UnsupportedLayerError(f"{target.name}: calibration handles Conv2d/Linear, not {type(module).__name__}")
        if seq and work_model is None:
            raise DataError("sequential calibration needs work_model (the partially compressed model)")
        if self._graph is not None:
            acc = _Accumulator(self, target, seq, raw)
            try:
                self._fast_stats(acc, work_model, seq)
                return acc.result()
            except (_NoFast, AttributeError, torch.fx.proxy.TraceError) as e:
                # this graph cannot serve the request (a layer called without a positional input, a work model
                # whose attributes moved): answer with the per-layer scheme from now on
                self._graph = None
                self.scheme_used, self.fallback_reason = "per-layer", f"fast scheme stopped: {e}"
        acc = _Accumulator(self, target, seq, raw)
        self._per_layer_stats(acc, work_model, seq)
        return acc.result()

    def _keep_smallest(self, keys: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> tuple:
        """The ``raw_columns`` columns with the smallest keys, in their original (arrival) order."""
        if keys.numel() <= self.raw_columns:
            return keys, X, Y
        idx = keys.topk(self.raw_columns, largest=False).indices.sort().values
        return keys[idx], X[:, idx], Y[:, idx]


__all__ = ["Calibrator", "LayerStats", "im2col", "layer_columns", "conv_padding", "SCHEMES", "DEFAULT_SCHEME", "DEFAULT_CACHE_LIMIT"]
