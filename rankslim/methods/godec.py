"""``godec``: data-free low rank + sparse (GoDec, Zhou & Tao 2011) — GreBdec's "naive decomposition".

Knob → (rank, cardinality), shared with ``grebdec``: knob ``r`` buys ``P = r·(m + k)`` stored
numbers (what ``svd`` stores at rank ``r``).  The low-rank part takes ``r_L = ⌊(1 − s)·r⌋`` of it
and the rest goes to the sparse part at 2 numbers per non-zero (COO):
``c = min(m·k, ⌊(r − r_L)(m + k)/2⌋)`` with ``s = sparse_share = 0.5``.  So every knob stores
``≈ r·(m + k)`` numbers like all other methods, and the cost grows strictly with ``r``.  For
``r_L = 0`` (knob 1 at s = 0.5) the layer is sparse-only.

``sparse_share`` is a class attribute because the cost must be known before ``method_options``
reach the method; register a subclass to change it.

Options: ``godec_iters`` (default 100), ``power`` (BRP power iterations, default 2), ``exact``
(SVD L-step, default False).
"""
from __future__ import annotations

import math
from typing import ClassVar

from torch import nn

from ..cost import Cost
from ..decompose.godec import godec
from ..decompose.prune import magnitude_prune
from ..layers.sparse import SPARSE_NOTE, build_lowrank_sparse
from ..options import Opt, bool_, int_
from ..surgery import Target
from .base import DecomposeContext, Method, register


def ls_split(target: Target, knob: int, sparse_share: float) -> tuple[int, int]:
    """``(r_L, c)`` for knob ``knob``: ``r_L = ⌊(1 − s)·knob⌋``, ``c = min(m·k, ⌊(knob − r_L)(m + k)/2⌋)``."""
    if not 0.0 <= sparse_share <= 1.0:
        raise ValueError(f"sparse_share must lie in [0, 1], got {sparse_share}")
    m, k = target.matrix_shape
    r_l = min(int(math.floor((1.0 - sparse_share) * knob + 1e-9)), min(m, k))
    c = int(min(m * k, ((knob - r_l) * (m + k)) // 2))
    return r_l, c


def ls_cost(target: Target, r_l: int, card: int) -> Cost:
    """Cost of ``U (m×r_L) V (r_L×k) + S`` (card non-zeros, COO) applied at every output position, bias kept."""
    m, k = target.matrix_shape
    bias = m if target.has_bias else 0
    return Cost(r_l * (m + k) + 2 * card + bias, target.positions * (r_l * (m + k) + card))


def ls_layer(target: Target, U, V, S, mask, bias) -> nn.Module:
    """Build the L+S (or sparse-only when ``U`` has no column) replacement of ``target``."""
    r_l = 0 if U is None else int(U.shape[1])
    layer = build_lowrank_sparse(target.module, r_l)
    if r_l == 0:
        return layer.set_sparse(S, mask, bias)
    return layer.set_factors(U, V, S, mask, bias)


@register
class GoDecMethod(Method):
    """``min ‖W − L − S‖_F`` s.t. ``rank(L) ≤ r_L``, ``card(S) ≤ c`` by GoDec (BRP low-rank step)."""

    name = "godec"
    options = (Opt("godec_iters", int_, 100, "GoDec alternations"),
               Opt("power", int_, 2, "power iterations of the bilateral random projections"),
               Opt("exact", bool_, False, "exact truncated SVD instead of bilateral random projections"))
    description = "data-free low rank + sparse (GoDec: bilateral random projections + hard thresholding)"
    sparse_share: ClassVar[float] = 0.5

    def split(self, target: Target, rank: int) -> tuple[int, int]:
        """``(r_L, c)`` of knob ``rank`` for this target."""
        return ls_split(target, rank, self.sparse_share)

    def cost(self, target: Target, rank: int) -> Cost:
        return ls_cost(target, *self.split(target, rank))

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        r_l, c = self.split(target, rank)
        o = ctx.options
        bias = target.module.bias.detach() if target.has_bias else None
        info = {"rank": rank, "lowrank_rank": r_l, "nnz": c, "ranks": f"r{r_l}+nnz {c}",
                "sparse_share": self.sparse_share, "sparse_note": SPARSE_NOTE}
        if r_l == 0:
            S, mask = magnitude_prune(target.matrix, c)
            return ls_layer(target, None, None, S, mask, bias), {**info, "mode": "magnitude"}
        res = godec(target.matrix, r_l, c, iters=int(o.get("godec_iters", 100)), power=int(o.get("power", 2)),
                    exact=bool(o.get("exact", False)), generator=ctx.generator)
        W2 = float((target.matrix.double() ** 2).sum())
        info.update({"iterations": res.iterations, "weight_rel_error": round(res.objective[-1] / max(W2, 1e-300), 6)})
        return ls_layer(target, res.U, res.V, res.S, res.mask, bias), info

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        return build_lowrank_sparse(module, int(info["lowrank_rank"]))


__all__ = ["GoDecMethod", "ls_split", "ls_cost", "ls_layer"]
