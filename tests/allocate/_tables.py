"""Synthetic cost tables with random spectra (shared by the allocator tests)."""
from __future__ import annotations

import torch

from rankslim.allocate import CostTable, LayerOption
from rankslim.cost import Cost


def lowrank_option(name: str, m: int, n: int, positions: int, sigma: torch.Tensor) -> LayerOption:
    """A layer whose rank-r factorization costs r (m + n) params and positions * r (m + n) MACs."""
    k = min(m, n)
    return LayerOption(name, k, Cost(m * n, positions * m * n),
                       lambda r, m=m, n=n, p=positions: Cost(r * (m + n), p * r * (m + n)), sigma[:k])


def random_table(seed: int, layers: int = 5, round_to: int = 1) -> CostTable:
    """Layers of random shapes and decaying random spectra, plus 5% untouched cost."""
    g = torch.Generator().manual_seed(seed)
    opts = []
    for i in range(layers):
        m, n = (int(v) for v in torch.randint(6, 40, (2,), generator=g))
        pos = int(torch.randint(1, 50, (1,), generator=g))
        k = min(m, n)
        decay = float(torch.rand(1, generator=g)) * 0.5 + 0.05
        s = torch.exp(-decay * torch.arange(k, dtype=torch.float64)) * (1 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64))
        s = s.sort(descending=True).values
        opts.append(lowrank_option(f"l{i}", m, n, pos, s))
    dense = Cost()
    for o in opts:
        dense = dense + o.dense
    original = Cost(int(dense.params * 1.05), int(dense.macs * 1.05))
    return CostTable(opts, original, round_to=round_to, quantities=("params", "macs"))
