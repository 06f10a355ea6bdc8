"""Independent measurements of a built model: stored numbers and multiply-accumulates.

Nothing here imports rankslim: the tests compare the library's claims (budgets, reports) with what
these helpers count on the modules themselves, so a bug in rankslim's cost model cannot hide in
both places at once.

Masked (sparse) layers are recognised by their structure, not by their class: a module holding a
``weight`` Parameter and a boolean buffer named ``mask`` of the same shape, whose forward pass
uses ``weight * mask`` (this is how ``rankslim/layers/sparse.py`` stores a sparse matrix: dense-
shaped values plus a dense boolean mask, run as a dense masked op).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that store a sparse weight as ``weight`` + boolean ``mask`` of equal shape.

    Returns ``{qualified name: module}`` in ``named_modules`` order.
    """
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        w = mod._parameters.get("weight")
        mask = mod._buffers.get("mask")
        if isinstance(w, nn.Parameter) and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool \
                and mask.shape == w.shape:
            out[name] = mod
    return out


def count_params(model: nn.Module) -> int:
    """Stored numbers of ``model``: every ``nn.Parameter`` object counted once.

    Tied parameters (one Parameter object reachable under several names) are counted once; two
    different Parameter objects are both counted even if equal.  Buffers (BatchNorm statistics, masks)
    are not counted: they are not parameters in the budget's sense.

    Sparse layers (see :func:`masked_modules`): their dense-shaped ``weight`` Parameter is replaced by
    the size of a COO copy of its kept entries, built here from the module's own tensors:
    ``values = weight[mask]`` (``nnz`` numbers) and ``flat indices = mask.flatten().nonzero()``
    (``nnz`` numbers), i.e. ``2 * nnz`` stored numbers, one value and one *flat* index per non-zero.
    This is the storage the report claims (DDLR's counting).  It is not what the PyTorch module holds
    in memory (``weight.numel()`` floats + ``weight.numel()`` bools), nor torch's own COO layout
    (``ndim`` coordinates per non-zero, i.e. ``(1 + weight.dim()) * nnz``); the budget tests check the
    report's claimed format, so that is what is counted.
    """
    sparse_weights = {id(m.weight): m for m in masked_modules(model).values()}
    seen: set[int] = set()
    total = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod = sparse_weights.get(id(p))
        if mod is None:
            total += p.numel()
            continue
        with torch.no_grad():
            values = p[mod.mask]
            flat_index = mod.mask.flatten().nonzero().flatten()
        total += values.numel() + flat_index.numel()
    return int(total)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates per sample of ``model`` on ``example_input`` (shape ``(batch, ...)``).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eval-mode, no-grad forward pass:
    MACs = FLOPs / 2 (matmuls and convolutions; bias, BatchNorm, activations and element-wise ops are
    not counted), divided by the batch size.

    Sparse layers (see :func:`masked_modules`) run a *dense* masked op, which FlopCounterMode counts
    as ``weight.numel()`` MACs per output position.  What a sparse kernel multiplies is one MAC per
    kept weight per output position, so the FLOPs seen inside each such module (measured as the
    counter's difference across the module's forward call) are scaled by ``nnz / weight.numel()``
    (``nnz = mask.sum()``).  For groups = 1 convolutions and Linear layers this is exactly
    ``nnz * output positions``.
    """
    batch = int(example_input.shape[0])
    if batch < 1:
        raise ValueError("example_input needs a batch dimension with at least one sample")
    sparse = masked_modules(model)
    spans: dict[str, list[int]] = {n: [] for n in sparse}
    was_training = model.training
    model.eval()
    handles = []
    counter = FlopCounterMode(display=False)

    def pre(name: str):
        def fn(_m, _args):
            spans[name].append(-counter.get_total_flops())
        return fn

    def post(name: str):
        def fn(_m, _args, _out):
            spans[name][-1] += counter.get_total_flops()
        return fn

    for name, mod in sparse.items():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    try:
        with torch.no_grad(), counter:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flops = float(counter.get_total_flops())
    for name, mod in sparse.items():
        dense = float(sum(spans[name]))
        kept = float(mod.mask.sum()) / mod.mask.numel()
        flops += dense * kept - dense
    return int(round(flops / 2 / batch))


__all__ = ["count_macs", "count_params", "masked_modules"]
