"""Budget-free rank rules from signal processing (COBLA paper section 4, compared in section 5.2).

* ``vbmf`` — R-VBMF (Kim et al., ICLR 2016): each layer's rank is the EVBMF rank (Nakajima et
  al. 2013, :func:`rankslim.decompose.evbmf.evbmf`) of the matrix its method factorizes; methods
  that define ``evbmf_knob(target)`` (spatial: Tai's rearranged kernel; tucker: the two channel
  unfoldings) use it, others the im2col matrix.
* ``gavish-donoho`` — optimal hard threshold for an unknown noise level (Gavish & Donoho, IEEE
  TIT 2014, eq. 5 with the approximation of their section III-E):
  ``tau = omega(beta) * y_med``, ``omega(beta) ~= 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``,
  ``beta = a / b <= 1`` the aspect ratio of the factorized matrix, ``y_med`` the median singular
  value; rank = number of singular values above ``tau`` (at least 1).

Neither rule can be told a budget: they decide the cost themselves.  rankslim's choice (documented
in docs/allocation.md): the budget is treated as an upper bound that is *checked* — the ranks are
returned when they meet it, otherwise :class:`BudgetError` says what the rule yields.  Pass
``params=1.0`` (or ``macs=1.0``) to accept whatever the rule gives; ``Allocation.info["yields"]``
holds the resulting fractions either way.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import BudgetError
from .base import Allocation, AllocationContext, Budget, CostTable, Ranks, budget_fractions


def gavish_donoho_omega(beta: float) -> float:
    """Gavish & Donoho's approximation of the optimal threshold coefficient for unknown noise,
    ``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` (``omega(1) = 2.86``)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"the aspect ratio beta must lie in (0, 1], got {beta}")
    return 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43


def gavish_donoho_rank(sigma: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values of an ``(a, b)`` matrix above ``omega(beta) * median(sigma)``;
    ``sigma``: all ``min(a, b)`` singular values (any order).  May be 0 (pure noise)."""
    a, b = sorted(int(s) for s in shape)
    s = sigma.double().flatten()
    if s.numel() != a:
        raise ValueError(f"expected {a} singular values for a {shape[0]}x{shape[1]} matrix, got {s.numel()}")
    tau = gavish_donoho_omega(a / b) * float(np.median(s.cpu().numpy()))
    return int((s > tau).sum())


def _matrix_shape(target, method) -> tuple[int, int]:
    """Shape of the matrix whose spectrum ``method`` truncates (its ``spectrum_shape`` capability)."""
    shape = method.spectrum_shape(target)
    if shape is None:
        raise BudgetError(f"the gavish-donoho allocator thresholds the singular values of one matrix per layer; "
                          f"method {method.name!r} of layer {target.name!r} has no such matrix (use svd or spatial)")
    return shape


def _check(table: CostTable, budget: Budget, ranks: Ranks, rule: str, raw: dict[str, int]) -> Allocation:
    fr = budget_fractions(table, ranks)
    info = {"yields": fr, "rule_ranks": raw}
    if budget.is_set() and not table.fits(ranks, budget):
        asked = ", ".join(f"{q} <= {getattr(budget, q):g}" for q in budget.quantities)
        raise BudgetError(f"{rule} decides the cost itself and gives params {fr['params']:.3f}, macs {fr['macs']:.3f} "
                          f"of the original, which breaks the budget ({asked}); its budget cannot be set — pass "
                          "params=1.0 to accept what it yields, or use a budgeted allocator (cobla, pos-cvx, cptv)")
    return Allocation(ranks, info=info)


def vbmf_allocate(table: CostTable, budget: Budget, *, context: AllocationContext) -> Allocation:
    """R-VBMF: the EVBMF rank of every layer (clipped to ``[1, max_rank]``), budget only checked."""
    from ..decompose.evbmf import evbmf
    by_name = table.by_name()
    ranks: Ranks = {}
    raw: dict[str, int] = {}
    for t in context.targets:
        lo = by_name[t.name]
        m = context.methods[t.name]
        rule = getattr(m, "evbmf_knob", None)
        r = int(rule(t)) if rule is not None else int(evbmf(t.matrix).rank)
        raw[t.name] = r
        ranks[t.name] = table.decide(lo, max(1, min(r, lo.max_rank)))
    return _check(table, budget, ranks, "vbmf (R-VBMF)", raw)


def gavish_donoho_allocate(table: CostTable, budget: Budget, *, context: AllocationContext) -> Allocation:
    """Gavish-Donoho hard threshold rank of every layer (at least 1), budget only checked."""
    by_name = table.by_name()
    ranks: Ranks = {}
    raw: dict[str, int] = {}
    for t in context.targets:
        lo = by_name[t.name]
        r = gavish_donoho_rank(lo.sigma, _matrix_shape(t, context.methods[t.name]))
        raw[t.name] = r
        ranks[t.name] = table.decide(lo, max(1, min(r, lo.max_rank)))
    return _check(table, budget, ranks, "gavish-donoho", raw)


__all__ = ["gavish_donoho_allocate", "gavish_donoho_omega", "gavish_donoho_rank", "vbmf_allocate"]
