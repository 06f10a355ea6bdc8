"""Layer-streamed compression: models bigger than memory, one block at a time from a safetensors checkpoint.

:func:`compress_streamed` never holds the whole model.  It builds the model's skeleton with every parameter on
the ``meta`` device (no storage; buffers such as RoPE frequencies stay real because checkpoints do not hold
them), then walks the checkpoint:

1. **front**: one pass of the calibration inputs up to the first block.  A module before the blocks is loaded
   from the checkpoint the moment it is first called (the embeddings, ...); every block is replaced by a
   recorder that keeps the arguments the model passes it (hidden states, position embeddings, masks) and the
   last one stops the pass, so nothing after the blocks is ever loaded or run.
2. **blocks**, one at a time: load the block, compress it with the pipeline stages (select -> calibrate ->
   cost_table -> allocate -> build -> finalize) on a small wrapper that calls the block as the model does,
   with the captured hidden states as the calibration data; run it to get the next block's inputs; write its
   compressed ``state_dict`` to its own shard; put it back on ``meta``.
3. **rest**: the tensors of the modules after the blocks (final norm, LM head) are copied from the checkpoint
   to a shard, without building those modules.

Two hidden-state streams go from block to block: the ORIGINAL model's (original blocks) and the COMPRESSED
model's (compressed blocks).  Data-aware methods take their targets ``y`` from the first and, in sequential
mode, their inputs ``x`` from the second, so a streamed run is the same computation as
``rankslim.compress(model, ...)`` on the whole model (GreBdec eq. 1 across blocks, not only inside one), with
the same ranks whenever the rank rule is per layer (``ratio``, ``energy``, ``ranks``).  Budgets (``params``)
are per block: a fraction of each block's target (Linear/Conv) parameters, met inside that block.

Memory: one block (plus the calibrator's copy of it and its float64 statistics), the calibration hidden
states (``2 x samples x tokens x hidden``, a few MB), and the largest module before or after the blocks.

The output is a directory (:func:`load_streamed` rebuilds the model from it)::

    streamed.json            format, blocks path, files in load order, plan and report
    pre.safetensors          modules before the blocks (embeddings)
    block-00000.safetensors  one compressed block each; its plan (full layer names) in the safetensors header
    ...
    post.safetensors         modules after the blocks (final norm, LM head)

Every file is written to a temporary name in the directory and renamed into place only when the whole run
succeeded (``streamed.json`` last); a directory holding files rankslim did not write is refused; nothing is
ever deleted but this run's own temporary files.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .allocate import Budget
from .bench import fix_heap_thresholds, give_back_memory, rss_bytes
from .errors import BudgetError, CheckpointError, DataError, OptionError, RankslimError
from .plan import PLAN_METADATA_KEY, LayerPlan, Plan, apply_plan, attach_plan, check_plan
from .outputs import _tmp_name
from .report import LayerRow

#: ``format`` of the manifest of a streamed output directory
STREAMED_FORMAT = "rankslim-streamed"
STREAMED_VERSION = 1
#: ``compact_heap``: glibc's mmap threshold and trim threshold, bytes (measured on the 1.1B Llama: the peak stays
#: at the one-block figure, with no change in time)
COMPACT_HEAP = (4 * 2**20, 16 * 2**20)
MANIFEST = "streamed.json"
PRE, POST = "pre.safetensors", "post.safetensors"
_BLOCK_FILE = re.compile(r"^block-\d{5}\.safetensors$")
#: keyword arguments that would make a block keep state between calls (a KV cache grows with every call)
_STATEFUL_KWARGS = {"past_key_values": None, "past_key_value": None, "layer_past": None, "use_cache": False,
                    "output_attentions": False}
#: the block-call batch: the captured hidden states are cut into batches of this many sequences, as
#: rankslim.data.calibration_batches does, so streamed and in-memory runs see the same batches
BATCH = 64


class _Stop(Exception):
    """Raised by the last block's recorder: everything after the blocks is neither loaded nor run."""


# ------------------------------------------------------------------------------------------------ skeleton


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within the block, every ``nn.Parameter`` registered on a module is moved to the ``meta`` device.

    Buffers stay real: non-persistent ones (RoPE ``inv_freq``) are computed at construction and are not in
    checkpoints.  A parameter's storage exists only between its creation and its registration (``torch.empty``
    pages are not touched), and initialisers that run after registration run on ``meta``.  The patch of
    ``nn.Module.register_parameter`` is process-wide while the block runs (do not build models in other threads).
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_model(build_model: Callable[[], nn.Module]) -> nn.Module:
    """``build_model()`` with its parameters on ``meta`` (no weight storage) and in eval mode."""
    with params_on_meta():
        model = build_model()
    if not isinstance(model, nn.Module):
        raise RankslimError(f"build_model must return an nn.Module, got {type(model).__name__}")
    return model.eval()


def model_builder(spec: str | os.PathLike) -> Callable[[], nn.Module]:
    """A ``build_model`` callable from a spec: a Hugging Face ``config.json`` (or a directory holding one; the
    class named in its ``architectures``, looked up in ``transformers`` only, built offline), or
    ``package.module:function`` / ``file.py:function`` (the function itself, not called here).
    :class:`ModelSpecError` when the spec names nothing usable."""
    from .errors import ModelSpecError
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(".json"):
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ModelSpecError(f"{config_file} does not exist: pass a transformers config.json (or its directory) "
                                 "or package.module:function")
        import transformers
        try:
            config = transformers.AutoConfig.from_pretrained(str(config_file), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
            raise ModelSpecError(f"{config_file} is not a transformers config: {str(exc).splitlines()[0]}") from exc
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise ModelSpecError(f"{config_file} names no transformers architecture ({names or 'none'}); set "
                                 "\"architectures\" in it, e.g. [\"LlamaForCausalLM\"]")
        return lambda: cls(config)
    mod_name, sep, fn_name = text.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise ModelSpecError(f"model {text!r}: expected a transformers config.json (or its directory), "
                             "package.module:function or file.py:function")
    from .zoo import _import_from_file, _import_module
    try:
        module = _import_from_file(Path(mod_name).expanduser()) if mod_name.endswith(".py") else _import_module(mod_name)
    except ModelSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure of the user's module
        raise ModelSpecError(f"cannot import {mod_name}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelSpecError(f"{mod_name} has no function {fn_name!r}")
    return fn


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the repeated blocks: ``blocks`` (e.g. ``"model.layers"``) or, when ``None``,
    the ``nn.ModuleList`` holding the most parameters.  :class:`RankslimError` when there is none."""
    if blocks is None:
        lists = [(sum(p.numel() for p in m.parameters()), n) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) and n]
        if not lists:
            raise RankslimError(f"{type(model).__name__} has no nn.ModuleList of blocks; pass blocks='path.to.blocks'")
        blocks = max(lists)[1]
    try:
        mod = model.get_submodule(blocks)
    except AttributeError:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
        raise RankslimError(f"blocks={blocks!r} names no submodule of {type(model).__name__}; ModuleLists there: "
                            f"{', '.join(lists[:8]) or 'none'}") from None
    if not isinstance(mod, nn.ModuleList) or not len(mod):
        raise RankslimError(f"blocks={blocks!r} is a {type(mod).__name__}, not a non-empty nn.ModuleList of blocks")
    return blocks, mod


# -------------------------------------------------------------------------------------------- checkpoint


class Checkpoint:
    """Tensors of one or more safetensors files, read by name without loading the rest.

    Only the headers are read on opening (names, shapes, dtypes).  :meth:`read` opens each file it needs,
    copies the tensors out and closes it again, so the memory map does not keep pages of the whole checkpoint
    resident as the blocks go by.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        from safetensors import safe_open
        if isinstance(paths, (str, os.PathLike)):
            p = Path(paths)
            paths = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
            if not paths:
                raise CheckpointError(f"{p} holds no .safetensors file")
        self.files = [Path(p) for p in paths]
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nbytes = 0
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        if k in self.where:
                            raise CheckpointError(f"tensor {k!r} is in both {self.where[k]} and {f}")
                        self.where[k], self.shapes[k] = f, tuple(sl.get_shape())
                        n = 1
                        for s in self.shapes[k]:
                            n *= s
                        self.nbytes += n * _itemsize(sl.get_dtype())
            except FileNotFoundError:
                raise CheckpointError(f"no such checkpoint file: {f}") from None
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors' own error types for damaged headers
                raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` (CPU, the checkpoint's dtype); :class:`CheckpointError` for a missing name."""
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.where:
                raise CheckpointError(f"the checkpoint has no tensor {n!r}")
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as h:
                    for n in ns:
                        out[n] = h.get_tensor(n)
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot read {ns[0]!r} (truncated or corrupt?): {exc}") from exc
        return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state name -> all names of that same tensor (tied weights share one Parameter)."""
    groups: dict[int, list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(n)
    return {n: g for g in groups.values() for n in g}


@dataclass
class _Source:
    """Where the skeleton's state comes from: the checkpoint name of each state entry (or ``None`` for a
    buffer the checkpoint does not hold, which keeps the value the model computed)."""

    ckpt: Checkpoint
    names: dict[str, str | None]

    @classmethod
    def check(cls, model: nn.Module, ckpt: Checkpoint) -> "_Source":
        """Match every state entry of ``model`` to the checkpoint before any work: missing parameters and
        shapes that differ are refused with :class:`CheckpointError`."""
        aliases = _aliases(model)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names: dict[str, str | None] = {}
        missing, wrong = [], []
        for key, t in model.state_dict(keep_vars=True).items():
            found = next((a for a in [key, *aliases.get(key, [])] if a in ckpt), None)
            if found is None:
                if key in params:
                    missing.append(key)
                names[key] = None
                continue
            if ckpt.shapes[found] != tuple(t.shape):
                wrong.append(f"{key}: checkpoint {ckpt.shapes[found]} vs model {tuple(t.shape)}")
            names[key] = found
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) of the model, e.g. "
                                  f"{', '.join(repr(m) for m in missing[:3])}; was it saved from this model definition "
                                  f"(keys are state_dict names)? It holds {len(ckpt.where)} tensors in "
                                  f"{len(ckpt.files)} file(s)")
        if wrong:
            raise CheckpointError(f"checkpoint shapes differ from the model's: {'; '.join(wrong[:3])}; build the "
                                  "model from the config the checkpoint was saved with")
        return cls(ckpt, names)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def materialize(model: nn.Module, keys: Iterable[str], source: _Source) -> None:
    """Load the state entries ``keys`` of ``model`` from the checkpoint, in the skeleton's dtype, in place.

    A tied parameter becomes a tensor of its own in this module (its other names stay where they are)."""
    keys = list(keys)
    got = source.ckpt.read(sorted({source.names[k] for k in keys if source.names.get(k)}))
    for key in keys:
        name = source.names.get(key)
        if name is None:
            continue  # a buffer the model computed itself
        mod, attr = _owner(model, key)
        if attr in mod._parameters:
            old = mod._parameters[attr]
            mod._parameters[attr] = nn.Parameter(got[name].to(old.dtype), requires_grad=old.requires_grad)
        else:
            old = mod._buffers[attr]
            mod._buffers[attr] = got[name].to(old.dtype)


def release(module: nn.Module) -> None:
    """Every parameter of ``module`` back on ``meta`` (storage freed once nothing else holds it)."""
    for mod in module.modules():
        for attr, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def resident_params(module: nn.Module) -> int:
    """Number of parameter entries of ``module`` that hold real storage (not ``meta``)."""
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


# ------------------------------------------------------------------------------------------- front pass


class _Recorder(nn.Module):
    """Stands in for block ``index`` during the front pass: keeps what the model passes it, returns its input
    unchanged (blocks map hidden states to hidden states of the same shape), and stops the pass at the last."""

    def __init__(self, index: int, last: bool, calls: list) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((self.index, args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs.get("hidden_states")


def _clean(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The block's keyword arguments without state kept between calls (KV caches)."""
    return {k: (_STATEFUL_KWARGS[k] if k in _STATEFUL_KWARGS else v) for k, v in kwargs.items()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return a is b


def _split(call: tuple, blocks_path: str) -> tuple[torch.Tensor, tuple, dict]:
    """``(hidden states, other positional arguments, keyword arguments)`` of one recorded block call."""
    index, args, kwargs = call
    kwargs = _clean(kwargs)
    if args and isinstance(args[0], torch.Tensor):
        return args[0], tuple(args[1:]), kwargs
    h = kwargs.pop("hidden_states", None)
    if args or not isinstance(h, torch.Tensor):
        raise RankslimError(f"block {index} of {blocks_path!r} is called without hidden states as its first "
                            "argument (or hidden_states=)")
    return h, (), kwargs


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for models that take it: no KV cache is built during the front pass."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


@dataclass
class _Front:
    """What the front pass found: the hidden states entering block 0 (``(N, ...)``, CPU), the other arguments
    of each block (the same for every calibration batch), and the modules it loaded."""

    hidden: torch.Tensor
    args: list[tuple[tuple, dict]]
    loaded: list[str]
    note: str | None = None


def _front(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, batches: list, source: _Source) -> _Front:
    """Run ``batches`` up to the blocks, loading the modules before them on first use (see the module docstring)."""
    from .inputs import call_model
    in_blocks = blocks_path + "."
    own: dict[str, list[str]] = {}  # module path -> its own state keys (not its children's)
    for key in source.names:
        if not key.startswith(in_blocks):
            own.setdefault(key.rpartition(".")[0], []).append(key)
    loaded: list[str] = []

    def load(path: str) -> None:
        if path not in loaded:
            materialize(model, own[path], source)
            loaded.append(path)

    calls: list = []
    originals = list(blocks)
    n = len(blocks)
    for i in range(n):
        blocks[i] = _Recorder(i, i == n - 1, calls)
    hooks = []
    for path in own:
        mod = model.get_submodule(path) if path else model
        hooks.append(mod.register_forward_pre_hook(lambda _m, _a, path=path: load(path)))
    extra = _call_kwargs(model)
    note = None
    per_batch: list[list] = []
    try:
        with torch.no_grad():
            for attempt in (0, 1):
                per_batch = []
                try:
                    for b in batches:
                        calls.clear()
                        try:
                            if isinstance(b, Mapping):
                                call_model(model, {**extra, **b})
                            elif extra:
                                model(*(b if isinstance(b, (tuple, list)) else (b,)), **extra)
                            else:
                                call_model(model, b)
                        except _Stop:
                            pass
                        if len(calls) != n:
                            raise RankslimError(f"the model called {len(calls)} of the {n} blocks of {blocks_path!r} "
                                                "in its forward pass; streamed mode needs every block called once, "
                                                "in order")
                        per_batch.append(list(calls))
                    break
                except RankslimError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if attempt:
                        raise RankslimError(f"the model does not run up to its blocks: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
                    # a parameter used without its module being called (a weight read directly): load every
                    # module outside the blocks and try again
                    note = (f"front pass needed every module outside the blocks loaded "
                            f"({type(exc).__name__} when loading them on first use)")
                    for path in own:
                        load(path)
    finally:
        for h in hooks:
            h.remove()
        for i, b in enumerate(originals):
            blocks[i] = b
    hidden, args = [], []
    for j, calls_j in enumerate(per_batch):
        if [c[0] for c in calls_j] != list(range(n)):
            raise RankslimError(f"the blocks of {blocks_path!r} are not called once each, in order")
        split = [_split(c, blocks_path) for c in calls_j]
        hidden.append(split[0][0].detach().clone())
        if j == 0:
            args = [(rest, kw) for _, rest, kw in split]
            continue
        for i, (_, rest, kw) in enumerate(split):
            if not (_same(args[i][0], rest) and _same(args[i][1], kw)):
                raise DataError(f"block {i}'s other inputs (masks, position embeddings) differ between calibration "
                                f"batch 0 and batch {j}; streamed mode needs unpadded calibration sequences of one "
                                "length (token ids of shape (N, T), no attention_mask with padding)")
    shapes = {tuple(h.shape[1:]) for h in hidden}
    if len(shapes) != 1:
        raise DataError(f"calibration batches give hidden states of different shapes {sorted(shapes)}; use "
                        "sequences of one length")
    return _Front(torch.cat(hidden), args, loaded, note)


# ---------------------------------------------------------------------------------------------- a block


class BlockCall(nn.Module):
    """One block called as the model calls it, for the pipeline stages.

    ``forward(x)`` takes ``x: (B, 2, ...)``: the hidden states of the compressed model (``x[:, 0]``) and of the
    original model (``x[:, 1]``) stacked on dim 1, and runs the block on the one the ``stream`` buffer names,
    with the other arguments the model passes this block.  ``stream`` is a buffer, not a Python attribute, so
    that the calibrator's private copy of the original (made in the calibrate stage, while ``stream`` is 1)
    keeps reading the original stream after this module switches to 0: targets ``y`` from the original model,
    inputs ``x`` from the compressed one, as in a whole-model run.
    """

    def __init__(self, block: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> None:
        super().__init__()
        self.block = block
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.register_buffer("stream", torch.ones(1, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.index_select(1, self.stream).squeeze(1))

    def run(self, h: torch.Tensor) -> torch.Tensor:
        """The block on hidden states ``h: (B, ...)``; its first output when it returns a tuple."""
        out = self.block(h, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _run(call: BlockCall, h: torch.Tensor) -> torch.Tensor:
    """``call.run`` over ``h`` in batches of :data:`BATCH` (no grad)."""
    with torch.no_grad():
        return torch.cat([call.run(h[s:s + BATCH]) for s in range(0, len(h), BATCH)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def is_layer(m: nn.Module) -> bool:
    """Layers the pipeline can target: Linear, Conv2d, Conv1d (and subclasses) and GPT-2's ``Conv1D``."""
    from .cost import is_hf_conv1d
    return isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) or is_hf_conv1d(m)


def _block_ranks(ranks: Any, names: Mapping[str, str]) -> Any:
    """``ranks`` for one block's wrapper: an int stays; ``{glob: rank}`` over FULL layer names becomes
    ``{wrapper name: rank}`` for this block's layers (``names``: wrapper name -> full name)."""
    if ranks is None or isinstance(ranks, int):
        return ranks
    out = {}
    for local, full in names.items():
        r = next((v for k, v in ranks.items() if fnmatch.fnmatchcase(full, k)), None)
        if r is not None:
            out[local] = r
    return out


class _OnDemandStats(dict):
    """The original-input statistics of the data-aware targets, computed when read and not kept.

    ``pipeline.calibrate(data_spectra=True)`` computes and holds every target's statistics of the block at once
    (two float64 matrices per layer: ~0.9 GB for a TinyLlama-sized block) for the allocator, which reads one
    layer's at a time (``cost_table``, in forward order); computed on demand only one layer's are resident.
    The values are the same: ``stats_for(target, sequential=False)`` on the calibrator's original.
    """

    def __init__(self, calibrator: Any, targets: Mapping[str, tuple[Any, bool]]) -> None:
        super().__init__()
        self.calibrator, self.targets = calibrator, dict(targets)

    def __contains__(self, name: object) -> bool:
        return name in self.targets

    def __getitem__(self, name: str) -> Any:
        target, raw = self.targets[name]
        return self.calibrator.stats_for(target, None, raw=raw, sequential=False)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self.targets else default

    def __len__(self) -> int:
        return len(self.targets)

    def __bool__(self) -> bool:
        return bool(self.targets)

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)


def _compress_block(call: BlockCall, stack: torch.Tensor, full: Callable[[str], str], *, method: str,
                    params: float | None, ratio: float | None, energy: float | None, ranks: Any,
                    allocator: str | None, allocator_options: Mapping[str, Any] | None,
                    method_options: Mapping[str, Any] | None, include: Sequence[str] | None,
                    exclude: Sequence[str] | None, min_params: int, round_to: int, sequential: bool, seed: int,
                    solver: str) -> Any:
    """The pipeline stages on one block (in place); returns the stages' :class:`CompressionResult`.

    ``stack: (N, 2, ...)``: compressed and original hidden states (see :class:`BlockCall`).  ``params`` is a
    fraction of the block's TARGET parameters, turned here into the stages' whole-module budget.
    """
    from .decompose.svd import clear_svd_cache
    from .pipeline import allocate, build, calibrate, choose_allocator, cost_table, finalize, select
    layer_names = {n: full(n) for n, m in call.named_modules() if is_layer(m)}
    inc = [n for n, f in layer_names.items() if (not include or any(fnmatch.fnmatchcase(f, g) for g in include))
           and not any(fnmatch.fnmatchcase(f, g) for g in (exclude or ()))]
    if not inc:
        raise RankslimError(f"no layer of block {full('block')!r} is left by include/exclude")
    call.stream.fill_(1)
    sel = select(call, None, method, method_options=method_options, include=inc, min_params=min_params,
                 keep_head=False, inplace=True, example_inputs=stack[:1])
    budget = Budget()
    if params is not None:
        total, targets = sel.original_cost.params, sum(t.dense_cost.params for t in sel.targets)
        budget = Budget(params=min(1.0, (total - (1.0 - params) * targets) / total))
    local_ranks = _block_ranks(ranks, {t.name: full(t.name) for t in sel.targets})
    alloc = choose_allocator(budget, ratio, energy, local_ranks, allocator, allocator_options)
    t0 = time.perf_counter()
    # allocation spectra are needed unless every rank is fixed per layer (ratio, explicit ranks)
    spectra = alloc is not None and alloc.name != "ratio"
    cal = calibrate(sel, stack, calib_samples=len(stack), sequential=sequential, seed=seed,
                    want_batches=alloc is not None and alloc.needs_context, data_spectra=False)
    if spectra and cal.calibrator is not None:
        aware = {t.name: (t, sel.methods[t.name].needs_raw and not sequential) for t in sel.targets
                 if sel.methods[t.name].needs_data}
        cal.original_stats = _OnDemandStats(cal.calibrator, aware)
    if sequential:
        call.stream.fill_(0)  # the work model now reads the compressed stream; the calibrator's original does not
    timings = {"calibrate": time.perf_counter() - t0}
    t0 = time.perf_counter()
    table = cost_table(sel, cal, quantities=budget.quantities, round_to=round_to, keep_head=False)
    allocation = allocate(sel, table, alloc, budget, ranks=local_ranks, calibration=cal, seed=seed, solver=solver)
    timings["allocate"] = time.perf_counter() - t0
    if any(m.needs_data for m in sel.methods.values()):
        # the SVD cache (rankslim.decompose.svd) now holds the whitened matrices of the allocation spectra,
        # temporaries that never recur: up to 1 GiB for nothing while the block is built
        clear_svd_cache()
        give_back_memory()  # before build, whose generalised SVDs are the block's largest allocations
    if sequential:
        # build recomputes every target's statistics on the compressed stream: the original-input ones were
        # only needed by the allocator
        cal.original_stats = {}
    t0 = time.perf_counter()
    built = build(sel, allocation, cal, seed=seed, solver=solver, inplace=True)
    timings["decompose"] = time.perf_counter() - t0
    return finalize(sel, built, allocation, cal, budget=budget, method=method,
                    budget_request={"params": params, "ratio": ratio, "energy": energy}, timings=timings)


# -------------------------------------------------------------------------------------------- the output


def _check_out(out: Path, ours: Iterable[str] = ()) -> None:
    """Refuse, before any work, an output path that is a file or a non-empty directory rankslim did not
    write a streamed output into (``ours``: this run's temporary files, which do not count)."""
    from .outputs import OutputDirError
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputDirError(f"output {out} exists and is not a directory; choose a new or empty directory")
        skip = set(ours)
        entries = [e.name for e in os.scandir(out) if e.name not in skip]
        if entries and _read_manifest(out, strict=False) is None:
            raise OutputDirError(f"output directory {out} already holds files rankslim did not write "
                                 f"({', '.join(sorted(entries)[:3])}); choose a new or empty directory")
        for name in entries:
            q = out / name
            if (name in (MANIFEST, PRE, POST) or _BLOCK_FILE.match(name)) and (q.is_symlink() or not q.is_file()):
                raise OutputDirError(f"{q} is not a regular file; move it away or choose another output directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputDirError(f"output directory {out} is not writable")


def _save_shard(path: Path, state: dict[str, torch.Tensor], plan: Plan, extra: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    meta = {PLAN_METADATA_KEY: plan.to_json(), **(extra or {})}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def _block_state(block: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The compressed block's state under full names; sparse (masked) layers packed as :func:`rankslim.save` does."""
    from .io import SPARSE_METADATA_KEY, pack_sparse
    state = {k: v.detach().cpu().clone() for k, v in block.state_dict().items()}
    state, sparse = pack_sparse(block, state)
    meta = {SPARSE_METADATA_KEY: json.dumps({prefix + k: v for k, v in sparse.items()}, sort_keys=True)} if sparse else {}
    return {prefix + k: v for k, v in state.items()}, meta


def _read_manifest(out: Path, strict: bool = True) -> dict | None:
    p = out / MANIFEST
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if strict:
            raise CheckpointError(f"{out} is not a streamed rankslim output (no {MANIFEST})") from None
        return None
    except (OSError, ValueError) as exc:
        if strict:
            raise CheckpointError(f"{p} is unreadable or not JSON: {exc}") from exc
        return None
    ok = (isinstance(d, dict) and d.get("format") == STREAMED_FORMAT and isinstance(d.get("version"), int)
          and isinstance(d.get("files"), list) and all(isinstance(f, str) and (f in (PRE, POST) or _BLOCK_FILE.match(f))
                                                      for f in d["files"]) and isinstance(d.get("blocks"), str))
    if not ok:
        if strict:
            raise CheckpointError(f"{p} is not a streamed rankslim manifest (format {STREAMED_FORMAT!r})")
        return None
    if d["version"] > STREAMED_VERSION and strict:
        raise CheckpointError(f"{p} has version {d['version']}, newer than this rankslim reads ({STREAMED_VERSION})")
    return d


# ---------------------------------------------------------------------------------------------- result


@dataclass
class BlockSummary:
    """One compressed block: its path, parameters before/after (the whole block; its targets alone), seconds,
    the relative error ``‖h_c − h_o‖ / ‖h_o‖`` of the hidden states after it (compressed model vs original, on
    the calibration inputs), and this process's resident memory after it (bytes)."""

    name: str
    params_before: int
    params_after: int
    target_params_before: int
    target_params_after: int
    seconds: float
    hidden_rel_error: float
    rss_bytes: int


@dataclass
class StreamedResult:
    """What :func:`compress_streamed` wrote and measured.

    ``out``: the output directory; ``plan``: every replaced layer (full names); ``rows``: one per target layer;
    ``blocks``: one :class:`BlockSummary` each; ``params_before``/``params_after``: the whole model (the modules
    outside the blocks unchanged); ``checkpoint_bytes``/``output_bytes``: tensor bytes read / written;
    ``peak_rss_bytes``: the process's peak resident memory at the end (since start or since the last
    :func:`reset_peak_rss`), ``start_rss_bytes`` its resident memory when the call began; ``seconds`` per phase
    and ``"total"``.
    """

    out: Path
    blocks_path: str
    plan: Plan
    rows: list[LayerRow]
    blocks: list[BlockSummary]
    params_before: int
    params_after: int
    checkpoint_bytes: int
    output_bytes: int
    calib_tokens: int
    start_rss_bytes: int
    peak_rss_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the plan as its JSON object)."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["plan"] = json.loads(self.plan.to_json())
        return d


def _progress(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None


# ---------------------------------------------------------------------------------------------- the API


def compress_streamed(
    build_model: Callable[[], nn.Module],
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    data: Any,
    method: str = "svd",
    blocks: str | None = None,
    params: float | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    ranks: int | Mapping[str, int] | None = None,
    allocator: str | None = None,
    allocator_options: Mapping[str, Any] | None = None,
    method_options: Mapping[str, Any] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_params: int = 0,
    round_to: int = 1,
    calib_samples: int = 256,
    sequential: bool = True,
    seed: int = 0,
    solver: str = "auto",
    transform: Callable[[Any], Any] | None = None,
    progress: bool | Callable[[str], None] = False,
    compact_heap: bool = False,
) -> StreamedResult:
    """Compress a model block by block from a safetensors ``checkpoint``, never holding the whole model.

    ``build_model()`` builds the (uncompressed) model definition, e.g.
    ``lambda: LlamaForCausalLM(LlamaConfig.from_json_file(...))``; it is called with parameters placed on
    ``meta`` (:func:`params_on_meta`), so no weights are allocated.  ``checkpoint``: a ``.safetensors`` file, a
    directory of them (Hugging Face shards) or a list of files, keyed by the model's ``state_dict`` names.
    ``blocks``: path of the ``nn.ModuleList`` of repeated blocks (``"model.layers"``); ``None`` picks the
    ModuleList with the most parameters.  Only the layers inside the blocks (Linear, Conv, GPT-2 ``Conv1D``) are
    compressed; embeddings, norms and everything outside the blocks (the LM head) are copied unchanged.

    ``data``: calibration inputs of the whole model, as :func:`rankslim.compress` takes them: token ids
    ``(N, T)``, a dict with ``input_ids``, a list, Dataset or DataLoader (``calib_samples`` of them are drawn
    with ``seed``; ``transform`` maps items to inputs).  Sequences must share one length and carry no padding
    (every block gets the same masks and position embeddings in every batch).  Data-free methods use it too:
    to trace shapes and to measure each block's hidden-state error.

    How much, PER BLOCK (each block is compressed on its own, so one block never sees another's spectrum):
    ``params`` = the fraction of each block's target (Linear/Conv) parameters kept, met by ``allocator`` (default
    CPTV) inside the block; or ``ratio`` / ``energy`` per layer; or ``ranks`` (an int, or ``{glob: rank}``
    over full layer names such as ``"model.layers.*.mlp.*"``).  ``include`` / ``exclude``: globs over full
    layer names.  ``method``, ``method_options``, ``allocator_options``, ``round_to``, ``min_params``,
    ``sequential`` and ``solver`` mean what they mean for :func:`rankslim.compress`.

    ``out``: a new or empty directory, or one this function wrote before (see the module docstring for the
    layout); :func:`load_streamed` rebuilds the compressed model from it.  ``progress``: True prints one line
    per block to stderr; a callable receives those lines.

    ``compact_heap=True`` fixes glibc's malloc thresholds for the rest of this PROCESS (allocations of 4 MiB and
    more are mapped and unmapped, the heap is trimmed above 16 MiB free; :data:`COMPACT_HEAP`): the freed
    float64 temporaries of one block then never fragment the heap for the next, and the peak stays at the
    one-block figure (1.1B Llama, zhang: 2.36 GiB at blocks 1-3 instead of 2.48 / 2.72 / 2.64, 3.23 GiB over 22).
    It is a process-wide setting that later code inherits (large tensors then page-fault on each allocation),
    so the API does it only when asked; ``rankslim compress-streamed`` does it by default.

    Equivalence: with ``ratio``/``energy``/``ranks`` the result equals ``rankslim.compress(model, ...)`` with
    the same settings and ``data`` on the whole model (same ranks; the same hidden states up to float
    rounding), sequential or not, except where a randomized SVD solver draws random numbers (one generator
    per block here).  Raises :class:`CheckpointError` (missing tensors, shapes), :class:`RankslimError`
    (blocks), :class:`DataError`, :class:`BudgetError`, :class:`OptionError` before any block is compressed.
    """
    from .data import calibration_batches
    from .decompose.svd import SOLVERS, clear_svd_cache
    from .pipeline import choose_allocator, split_method_options
    from .methods import get_method
    say = _progress(progress)
    t_start = time.perf_counter()
    start_rss = rss_bytes()[0]
    seconds: dict[str, float] = {}
    # every option is checked before anything is read
    if solver not in SOLVERS:
        raise OptionError(f"unknown SVD solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if params is not None and not 0.0 < float(params) <= 1.0:
        raise BudgetError(f"params is a fraction in (0, 1] of each block's Linear/Conv parameters, got {params}")
    choose_allocator(Budget(params=params), ratio, energy, ranks, allocator, allocator_options)
    for name, opts in split_method_options(method, method_options).items():
        if name != method:
            raise OptionError(f"options were given for method {name!r}, but every layer uses {method!r}")
        get_method(name, opts)
    get_method(method)
    out = Path(out)
    _check_out(out)
    if data is None:
        raise DataError("streamed compression needs calibration inputs (data=token ids (N, T), ...): they trace "
                        "the blocks' inputs, and data-aware methods calibrate on them")
    heap_note = None
    if compact_heap:
        heap_note = ("compact heap: glibc malloc thresholds fixed for this process (mmap from {} MiB, trim above {} "
                     "MiB)".format(*(v // 2**20 for v in COMPACT_HEAP)) if fix_heap_thresholds(*COMPACT_HEAP)
                     else "compact heap: not available here (glibc's mallopt only): the heap is left as it is")

    ckpt = Checkpoint(checkpoint)
    model = empty_model(build_model)
    blocks_path, block_list = find_blocks(model, blocks)
    source = _Source.check(model, ckpt)
    linear = [n for n, m in block_list.named_modules() if is_layer(m)]
    linear = [f"{blocks_path}.{n}" for n in linear]
    for what, globs in (("include", include), ("exclude", exclude),
                        ("ranks", list(ranks) if isinstance(ranks, Mapping) else None)):
        unknown = [g for g in globs or () if not any(fnmatch.fnmatchcase(n, g) for n in linear)]
        if unknown:
            raise OptionError(f"{what}: {unknown} match(es) no layer in the blocks (e.g. {linear[0]!r})"
                              if linear else f"the blocks of {blocks_path!r} hold no Linear/Conv layer")
    if not linear:
        raise RankslimError(f"the blocks of {blocks_path!r} hold no Linear/Conv layer to compress")
    batches = calibration_batches(data, calib_samples, seed=seed, transform=transform)
    seconds["setup"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    front = _front(model, blocks_path, block_list, batches, source)
    del batches
    seconds["front"] = time.perf_counter() - t0
    n_tokens = int(front.hidden[:, :, 0].numel()) if front.hidden.dim() >= 3 else int(len(front.hidden))
    say(f"front: {len(front.hidden)} calibration sequences, hidden states {tuple(front.hidden.shape)}; loaded "
        f"{', '.join(front.loaded) or 'nothing'} ({seconds['front']:.1f}s)")

    out_exists = out.exists()
    created = not out_exists
    out.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    notes = [n for n in (front.note, heap_note) if n]
    rows: list[LayerRow] = []
    plans: list[LayerPlan] = []
    summaries: list[BlockSummary] = []
    written = 0
    done = False
    in_blocks = blocks_path + "."
    try:
        # modules before the blocks: written from the modules the front pass loaded, then released
        pre_keys = [k for k in source.names if not k.startswith(in_blocks) and k.rpartition(".")[0] in front.loaded]
        state = model.state_dict()
        pre_state = {k: state[k].detach().clone() for k in pre_keys}
        del state
        tmps[PRE] = _tmp_name(out, PRE)
        _save_shard(tmps[PRE], pre_state, Plan([]))
        written += sum(t.numel() * t.element_size() for t in pre_state.values())
        del pre_state
        for path in front.loaded:
            release(model.get_submodule(path) if path else model)
        give_back_memory()

        comp = orig = front.hidden
        # parameters outside the blocks (each shared tensor once) are kept as they are
        params_before = params_after = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(in_blocks))
        for i in range(len(block_list)):
            t_block = time.perf_counter()
            prefix = f"{blocks_path}.{i}."
            keys = [k for k in source.names if k.startswith(prefix)]
            materialize(model, keys, source)
            block = block_list[i]
            before = sum(p.numel() for p in block.parameters())
            call = BlockCall(block, *front.args[i])
            call.eval()
            orig_next = _run(call, orig)  # the original model's stream, before the block changes
            stack = torch.stack([comp, orig], 1)
            result = _compress_block(
                call, stack, lambda n, prefix=prefix: prefix + n.removeprefix("block.") if n != "block" else prefix[:-1],
                method=method, params=params, ratio=ratio, energy=energy, ranks=ranks, allocator=allocator,
                allocator_options=allocator_options, method_options=method_options, include=include,
                exclude=exclude, min_params=min_params, round_to=round_to, sequential=sequential, seed=seed,
                solver=solver)
            del stack
            comp_next = _run(call, comp)
            err = _rel(comp_next, orig_next)
            comp, orig = comp_next, orig_next
            block = call.block
            block_list[i] = block
            for lp in result.plan.layers:
                plans.append(LayerPlan(prefix + lp.name.removeprefix("block."), lp.method, lp.info, lp.original_type))
            block_rows = [LayerRow(**{**asdict(r), "name": prefix + r.name.removeprefix("block.")})
                          for r in result.report.rows]
            rows += block_rows
            state, extra = _block_state(block, prefix)
            name = f"block-{i:05d}.safetensors"
            tmps[name] = _tmp_name(out, name)
            block_plan = Plan(plans[len(plans) - len(result.plan.layers):])
            _save_shard(tmps[name], state, block_plan, extra)
            written += sum(t.numel() * t.element_size() for t in state.values())
            after = sum(p.numel() for p in block.parameters())
            del state, result, call
            release(block)
            clear_svd_cache()  # its entries are of this block's weights, which are gone
            give_back_memory()
            params_before += before
            params_after += after
            summaries.append(BlockSummary(prefix[:-1], before, after, sum(r.params_before for r in block_rows),
                                          sum(r.params_after for r in block_rows), time.perf_counter() - t_block,
                                          err, rss_bytes()[0]))
            s = summaries[-1]
            say(f"block {i + 1}/{len(block_list)} {s.name}: targets {s.target_params_after:,}/"
                f"{s.target_params_before:,} params, hidden-state error {err:.4f}, {s.seconds:.1f}s, "
                f"RSS {s.rss_bytes / 2**20:,.0f} MiB")
        seconds["blocks"] = sum(s.seconds for s in summaries)

        # modules after the blocks: tensors copied from the checkpoint (the modules are never built)
        t0 = time.perf_counter()
        post_keys = [k for k in source.names if not k.startswith(in_blocks) and k not in pre_keys]
        skeleton_state = model.state_dict()
        post_state = {}
        got = ckpt.read(sorted({source.names[k] for k in post_keys if source.names[k]}))
        for k in post_keys:
            src = source.names[k]
            post_state[k] = (got[src].to(skeleton_state[k].dtype) if src else skeleton_state[k].detach().clone())
        del got, skeleton_state
        tmps[POST] = _tmp_name(out, POST)
        _save_shard(tmps[POST], post_state, Plan([]))
        written += sum(t.numel() * t.element_size() for t in post_state.values())
        del post_state
        seconds["post"] = time.perf_counter() - t0

        files = [PRE] + [f"block-{i:05d}.safetensors" for i in range(len(block_list))] + [POST]
        plan = Plan(plans)
        seconds["total"] = time.perf_counter() - t_start
        result = StreamedResult(
            out, blocks_path, plan, rows, summaries, params_before, params_after, ckpt.nbytes, written,
            n_tokens, start_rss, rss_bytes()[1], seconds,
            settings={"method": method, "params": params, "ratio": ratio, "energy": energy,
                      "ranks": ranks if not isinstance(ranks, Mapping) else dict(ranks), "allocator": allocator,
                      "sequential": sequential, "calib_samples": len(front.hidden), "seed": seed,
                      "budget_scope": "per block: fraction of each block's target (Linear/Conv) parameters"},
            notes=notes)
        old = _read_manifest(out, strict=False) if out_exists else None
        stale = sorted(f for f in (old or {}).get("files", []) if f not in files and (out / f).is_file())
        if stale:
            result.notes.append(f"{len(stale)} file(s) of an earlier run left in place (rankslim deletes nothing): "
                                f"{', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}")
        manifest = {"format": STREAMED_FORMAT, "version": STREAMED_VERSION, "blocks": blocks_path, "files": files,
                    "report": {k: v for k, v in result.to_dict().items() if k != "plan"}}
        tmps[MANIFEST] = _tmp_name(out, MANIFEST)
        tmps[MANIFEST].write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
        _check_out(out, [t.name for t in tmps.values()])  # again: something may have appeared while the blocks ran
        for name in [*files, MANIFEST]:  # the manifest last: it names a complete set of files
            os.replace(tmps.pop(name), out / name)
        done = True
        say(f"wrote {out} ({written / 2**20:,.0f} MiB); peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB, "
            f"{seconds['total']:.1f}s")
        return result
    except OSError as exc:
        raise CheckpointError(f"cannot write the streamed output to {out}: {exc.strerror or exc}") from exc
    finally:
        for tmp in tmps.values():  # only this run's own temporary files
            try:
                tmp.unlink()
            except OSError:
                pass
        if not done and created:
            try:
                out.rmdir()  # only when empty: a directory this call created
            except OSError:
                pass


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_streamed(path: str | os.PathLike, build_model: Callable[[], nn.Module],
                  map_location: str = "cpu") -> nn.Module:
    """The compressed model written by :func:`compress_streamed` into directory ``path``, in eval mode.

    ``build_model`` builds the original definition (the one compressed); it is built with its parameters on
    ``meta``, the plan of every shard is checked against it and applied, the shards' tensor names and shapes
    are compared with the result, and only then are the tensors read (one shard at a time) and assigned.
    Peak memory is about the compressed model plus one shard.  :class:`CheckpointError` for a missing or
    damaged file, :class:`~rankslim.errors.PlanError` for a plan that does not fit the model.
    """
    from safetensors.torch import load_file

    from .io import unpack_state, unpacked_shapes
    from .plan import _header, _plan_from
    d = Path(path)
    manifest = _read_manifest(d)
    layers: list[LayerPlan] = []
    heads = []
    for f in manifest["files"]:
        meta, shapes = _header(d / f)
        layers += _plan_from(d / f, meta).layers
        heads.append((f, meta, unpacked_shapes(d / f, meta, shapes)))
    plan = Plan(layers)
    model = empty_model(build_model)
    find_blocks(model, manifest["blocks"])
    check_plan(model, plan)
    with params_on_meta():  # the factorized layers' parameters too: they are assigned from the shards
        apply_plan(model, plan)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have: dict[str, tuple[int, ...]] = {}
    for f, _, shapes in heads:
        for k, s in shapes.items():
            if k in have:
                raise CheckpointError(f"{d}: tensor {k!r} is stored twice")
            have[k] = s
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(k for k in set(expected) - set(have) if k in params)
    unexpected = sorted(set(have) - set(expected))
    wrong = [f"{k}: file {have[k]} vs model {expected[k]}" for k in sorted(set(expected) & set(have))
             if have[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                         f"unexpected {unexpected[:3]}" if unexpected else "",
                                         f"wrong shapes {wrong[:3]}" if wrong else ""]))
        raise CheckpointError(f"{d} does not match the model definition given ({detail}); pass the definition "
                              "that was compressed")
    for f, meta, _ in heads:
        try:
            state = load_file(str(d / f), device=map_location)
        except Exception as exc:
            raise CheckpointError(f"{d / f} is truncated or corrupt: {exc}") from exc
        state = unpack_state(d / f, meta, state)
        for key, t in state.items():
            mod, attr = _owner(model, key)
            if attr in mod._parameters:
                old = mod._parameters[attr]
                mod._parameters[attr] = nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad)
            else:
                mod._buffers[attr] = t.to(mod._buffers[attr].dtype)
        del state
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"{d}: no stored value for {left[:3]}")
    attach_plan(model, plan)
    return model.eval()


__all__ = ["BlockCall", "BlockSummary", "Checkpoint", "StreamedResult", "compress_streamed", "empty_model",
           "find_blocks", "is_layer", "load_streamed", "materialize", "model_builder", "params_on_meta", "release",
           "resident_params"]
