"""The method interface: how one decomposition family plugs into select -> allocate -> build.

A method turns one :class:`~rankslim.surgery.Target` and a scalar *rank knob* ``r`` in
``[1, max_rank(target)]`` into a replacement module.  Allocators only see ``cost(target, r)`` and
``spectrum(target)``, so every method whose cost grows with one knob competes under the same
budgets.  Methods with several ranks (Tucker-2, TT, L+S) map the knob to their ranks themselves
and record the result in the JSON-able ``info`` dict that :meth:`Method.structure` reads back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..cost import Cost
from ..errors import RankslimError
from ..surgery import Target


@dataclass
class DecomposeContext:
    """Everything a method may use besides the target and its rank.

    ``stats``: calibration statistics of this target (or ``None`` when data-free);
    ``generator``: seeded RNG for randomized algorithms; ``solver``: SVD solver choice;
    ``options``: method-specific options passed through ``compress(**method_options)``.
    """

    generator: torch.Generator
    solver: str = "auto"
    stats: Any = None
    options: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of decomposition methods; subclasses register with :func:`register`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True when :meth:`decompose` needs calibration statistics (``ctx.stats``)
    needs_data: ClassVar[bool] = False

    def supports(self, target: Target) -> str | None:
        """``None`` when the method can decompose ``target``, otherwise the reason it cannot."""
        return None

    def max_rank(self, target: Target) -> int:
        """Largest meaningful knob value (full rank)."""
        return target.full_rank

    def cost(self, target: Target, rank: int) -> Cost:
        """Parameters and MACs (per sample) of the factorized layer at knob ``rank``."""
        raise NotImplementedError

    def spectrum(self, target: Target) -> torch.Tensor:
        """Descending importance values, one per knob step (singular values by default), float64."""
        from ..decompose.svd import singular_values
        return singular_values(target.matrix)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        """The replacement module for ``target`` at knob ``rank`` and its JSON-able ``info``."""
        raise NotImplementedError

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        """An uninitialised replacement for ``module`` shaped as ``info`` says (used to reload)."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` everywhere (API, CLI, plans)."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method called ``name``; a clear error listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise RankslimError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None
