"""Rank allocators: interchangeable strategies over one :class:`CostTable`.

``ALLOCATORS[name](table, budget, **options)`` returns ``{layer name: rank or None}``.
"""
from __future__ import annotations

from typing import Callable

from .base import Budget, CostTable, LayerOption, Ranks
from .simple import cptv_allocate, energy_allocate, ratio_allocate

Allocator = Callable[..., Ranks]

ALLOCATORS: dict[str, Allocator] = {
    "ratio": ratio_allocate,
    "energy": energy_allocate,
    "cptv": cptv_allocate,
}

__all__ = ["ALLOCATORS", "Allocator", "Budget", "CostTable", "LayerOption", "Ranks",
           "cptv_allocate", "energy_allocate", "ratio_allocate"]
