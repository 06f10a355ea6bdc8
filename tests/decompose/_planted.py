"""A planted low-rank + sparse matrix and calibration sums over random inputs (shared by the L+S tests)."""
from __future__ import annotations

import torch


def planted(m: int = 30, k: int = 40, r: int = 3, c: int = 60, n: int = 800, noise: float = 0.0, seed: int = 0):
    """``W = L + S`` (rank ``r``, ``c`` large spikes) and sums ``XX, YX, yy`` of ``Y = W X + noise`` over ``n`` columns."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, k, generator=g, dtype=torch.float64)
    S = torch.zeros(m * k, dtype=torch.float64)
    S[torch.randperm(m * k, generator=g)[:c]] = 8 * torch.randn(c, generator=g, dtype=torch.float64).sign()
    S = S.reshape(m, k)
    W = L + S
    X = torch.randn(k, n, generator=g, dtype=torch.float64) + 0.3
    Y = W @ X + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    return dict(W=W, L=L, S=S, X=X, Y=Y, XX=X @ X.T, YX=Y @ X.T, yy=float((Y * Y).sum()), n=n, r=r, c=c)
