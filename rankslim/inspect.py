"""Per-layer view of a model before compression: costs and singular-value energy."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cost import Cost, flop_counter_macs, model_cost, trace_shapes
from .decompose.svd import energy_rank, singular_values
from .surgery import Skipped, check_finite, select_targets


@dataclass
class LayerInfo:
    """One compressible layer: costs, full rank, ranks needed for energy levels, the spectrum."""

    name: str
    type: str
    shape: str
    params: int
    macs: int
    full_rank: int
    sigma: torch.Tensor
    rank_at: dict[float, int] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """All compressible layers, the skipped ones, and the model total (MACs as FlopCounterMode counts)."""

    layers: list[LayerInfo]
    skipped: list[Skipped]
    total: Cost


def inspect_model(model: nn.Module, input_shape: tuple[int, ...],
                  levels: tuple[float, ...] = (0.9, 0.99)) -> ModelInfo:
    """Costs and spectra of every compressible layer of ``model`` at per-sample ``input_shape``."""
    check_finite(model)
    shapes = trace_shapes(model, tuple(input_shape))
    targets, skipped = select_targets(model, shapes)
    rows = []
    for t in targets:
        sigma = singular_values(t.matrix)
        c = t.dense_cost
        rows.append(LayerInfo(t.name, type(t.module).__name__, t.describe_shape(), c.params, c.macs, t.full_rank,
                              sigma, {lv: energy_rank(sigma, lv) for lv in levels}))
    total = Cost(model_cost(model, input_shape, shapes).total.params, flop_counter_macs(model, input_shape))
    return ModelInfo(rows, skipped, total)


def plot_energy(info: ModelInfo, path: str | Path) -> Path:
    """Save cumulative squared-singular-value energy vs rank fraction, one curve per layer, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in info.layers:
        e = torch.cumsum(r.sigma ** 2, 0)
        e = e / e[-1].clamp_min(1e-300)
        x = torch.arange(1, len(e) + 1, dtype=torch.float64) / len(e)
        ax.plot(x.numpy(), e.numpy(), lw=1, label=r.name if len(info.layers) <= 12 else None)
    ax.set_xlabel("rank / full rank")
    ax.set_ylabel("fraction of squared singular values kept")
    ax.set_title("singular-value energy per layer")
    ax.grid(alpha=0.3)
    if len(info.layers) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
