"""Figures from compression reports (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from .report import Report


def plot_layer_costs(report: Report, path: str | Path, quantity: str = "both", title: str | None = None) -> Path:
    """Bar plot of the per-layer cost reduction of ``report`` (like COBLA's Fig. 5), saved to ``path``.

    One bar per target layer (forward order): ``100 * (1 - after / before)`` percent of its MACs
    per sample (``quantity="macs"``), of its parameters (``"params"``) or both side by side
    (``"both"``).  Layers kept dense show 0.  The title names the method, allocator, the whole-model
    kept fractions and the allocator's wall time (``report.seconds["allocate"]``).  Returns the path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if quantity not in ("macs", "params", "both"):
        raise ValueError(f"quantity must be 'macs', 'params' or 'both', got {quantity!r}")
    rows = report.rows
    if not rows:
        raise ValueError("the report has no target layers to plot")
    qs = ["macs", "params"] if quantity == "both" else [quantity]
    red = {q: [100.0 * (1.0 - getattr(r, f"{q}_after") / max(getattr(r, f"{q}_before"), 1)) for r in rows] for q in qs}
    width = 0.8 / len(qs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    xs = range(len(rows))
    colors = {"macs": "tab:blue", "params": "tab:orange"}
    for j, q in enumerate(qs):
        pos = [x + (j - (len(qs) - 1) / 2) * width for x in xs]
        bars = ax.bar(pos, red[q], width, label=f"{q.upper() if q == 'macs' else q} reduction", color=colors[q])
        if len(rows) <= 30:
            for b, v in zip(bars, red[q]):
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, max(v, 0)), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.name for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("cost reduction of the layer (%)")
    ax.set_ylim(min(0.0, *[min(v) for v in red.values()]) - 2, 105)
    f = report.fractions()
    alloc_s = report.seconds.get("allocate")
    sub = (f"model keeps params {100 * f['params']:.1f}%, MACs {100 * f['macs']:.1f}%"
           + (f"; allocation {alloc_s:.2f} s" if alloc_s is not None else ""))
    ax.set_title((title or f"{report.method} / {report.allocator}") + "\n" + sub, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plot_layer_costs"]
