"""Rank allocators: interchangeable strategies over one :class:`CostTable`.

``ALLOCATORS[name](table, budget, **options)`` returns ``{layer name: rank or None}``.
"""
from __future__ import annotations

from typing import Callable

from .base import Allocation, Budget, CostTable, LayerOption, Ranks
from .cobla import cobla_allocate
from .masked import apply_allocation_weights
from .pos import pos_cvx_allocate, pos_greedy_allocate
from .search import bayes_allocate, greedy_sensitivity_allocate
from .signal import gavish_donoho_allocate, vbmf_allocate
from .simple import cptv_allocate, energy_allocate, ratio_allocate

Allocator = Callable[..., Ranks]

ALLOCATORS: dict[str, Allocator] = {
    "ratio": ratio_allocate,
    "energy": energy_allocate,
    "cptv": cptv_allocate,
    "pos-greedy": pos_greedy_allocate,
    "pos-cvx": pos_cvx_allocate,
    "vbmf": vbmf_allocate,
    "gavish-donoho": gavish_donoho_allocate,
    "cobla": cobla_allocate,
    "bayes": bayes_allocate,
    "greedy-sensitivity": greedy_sensitivity_allocate,
}

__all__ = ["ALLOCATORS", "Allocation", "Allocator", "Budget", "CostTable", "LayerOption", "Ranks",
           "apply_allocation_weights", "bayes_allocate", "cobla_allocate", "cptv_allocate", "energy_allocate",
           "gavish_donoho_allocate", "greedy_sensitivity_allocate", "pos_cvx_allocate", "pos_greedy_allocate",
           "ratio_allocate", "vbmf_allocate"]
