"""Multiple-choice 0-1 programs: pick exactly one option per layer, minimise a sum, keep other sums in bounds.

Every exact allocator over tabulated candidates is this program with a different objective and rows:
``pos-cvx`` (maximise the log of captured energy under params / MAC budgets), the time-aware step of
speed-aware mode (:func:`rankslim.allocate.timed.fastest_within_error`: least measured time under the MAC
budget and an error cap) and ``benchmarks/speed_bound.py`` (least time at a MAC fraction).  It is solved by
SciPy's ``milp`` (HiGHS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class ChoiceRow:
    """One linear constraint ``lower <= sum_i values[i][choice_i] <= upper`` (one array per layer)."""

    values: Sequence[np.ndarray]
    lower: float = -np.inf
    upper: float = np.inf


@dataclass
class ChoiceResult:
    """``choice[i]``: the option index picked for layer ``i`` (``None`` when no solution was found), and HiGHS's
    status / message."""

    choice: list[int] | None
    status: int
    message: str


def solve_choice(objective: Sequence[np.ndarray], rows: Sequence[ChoiceRow], *, time_limit: float = 120.0,
                 mip_rel_gap: float = 0.0) -> ChoiceResult:
    """Minimise ``sum_i objective[i][choice_i]`` over one option per layer subject to ``rows``.

    ``objective[i]``: shape ``(n_i,)``, the cost of each option of layer ``i``; each row's ``values[i]`` has the
    same shape.  Rows are scaled to unit size for HiGHS (its feasibility tolerance is absolute), so callers
    should re-check the bounds on the returned choice in their own units.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(o) for o in objective]
    n = int(sum(sizes))
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    a, lbs, ubs = [], [], []
    for i in range(len(sizes)):
        one = np.zeros(n)
        one[offs[i]:offs[i + 1]] = 1.0
        a.append(one), lbs.append(1.0), ubs.append(1.0)
    for row in rows:
        vals = np.concatenate([np.asarray(v, dtype=float) for v in row.values])
        finite = [abs(b) for b in (row.lower, row.upper) if np.isfinite(b)]
        scale = max(max(finite, default=1.0), float(np.abs(vals).max(initial=0.0)) * 1e-6, 1e-12)
        a.append(vals / scale), lbs.append(row.lower / scale), ubs.append(row.upper / scale)
    obj = np.concatenate([np.asarray(o, dtype=float) for o in objective])
    res = milp(obj, constraints=LinearConstraint(np.array(a), lbs, ubs), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap})
    if res.x is None:
        return ChoiceResult(None, int(res.status), str(res.message))
    x = np.round(res.x)
    return ChoiceResult([int(np.argmax(x[offs[i]:offs[i + 1]])) for i in range(len(sizes))], int(res.status),
                        str(res.message))


__all__ = ["ChoiceResult", "ChoiceRow", "solve_choice"]
