"""The method interface: how one decomposition family plugs into select -> allocate -> build.

A method turns one :class:`~rankslim.surgery.Target` and a scalar *rank knob* ``r`` in
``[1, max_rank(target)]`` into a replacement module.  Allocators only see ``cost(target, r)`` and
``spectrum(target)``, so every method whose cost grows with one knob competes under the same
budgets.  Methods with several ranks (Tucker-2, TT, L+S) map the knob to their ranks themselves
and record the result in the JSON-able ``info`` dict that :meth:`Method.structure` reads back.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..cost import Cost
from ..errors import RankslimError
from ..options import Opt, describe, validate
from ..surgery import Target


@dataclass
class DecomposeContext:
    """Everything a method may use besides the target and its rank.

    ``stats``: calibration statistics of this target (or ``None`` when data-free);
    ``generator``: seeded RNG for randomized algorithms; ``solver``: SVD solver choice;
    ``options``: the method's validated options (every declared option, defaults filled in);
    ``weight``: when set, the weight to decompose instead of ``target.module.weight`` (same shape;
    an allocator's singular-value scales, COBLA's ``m_hat * P``, arrive this way).
    """

    generator: torch.Generator
    solver: str = "auto"
    stats: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None


class Method:
    """Base class of decomposition methods; subclasses register with :func:`register`.

    An instance carries its validated options (``self.config``); :meth:`configure` returns a configured
    copy, so one call's options never leak into another's and :meth:`cost` can depend on them.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True when :meth:`decompose` needs calibration statistics (``ctx.stats``)
    needs_data: ClassVar[bool] = False
    #: True when it also needs raw calibration columns (``ctx.stats.X``, ``ctx.stats.Y``)
    needs_raw: ClassVar[bool] = False
    #: the options :meth:`configure` accepts
    options: ClassVar[tuple[Opt, ...]] = ()

    def __init__(self) -> None:
        self.config: dict[str, Any] = validate(self.options, None, f"method {self.name!r}")

    def configure(self, options: Mapping[str, Any] | None = None) -> "Method":
        """A copy of this method with ``options`` validated (:class:`~rankslim.errors.OptionError` if not)."""
        m = copy.copy(self)
        m.config = validate(self.options, options, f"method {self.name!r}")
        return m

    @classmethod
    def option_help(cls) -> list[str]:
        """One line per declared option (name, type, default, help)."""
        return describe(cls.options)

    # ---- capabilities allocators may use (never method names) ------------------------------------

    def matricize(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The matrix whose singular values this method truncates exactly, or ``None`` when it has none.

        Methods that return a matrix here are *spectrum-masking*: keeping the first ``r`` singular
        triplets of that matrix is exactly the layer they build at knob ``r`` (COBLA's eqs. 3-4).
        """
        return None

    def unmatricize(self, M: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`matricize`: the weight of ``shape`` whose matricization is ``M``."""
        raise NotImplementedError(f"method {self.name!r} has no matricization")

    @property
    def maskable(self) -> bool:
        """True when :meth:`matricize` is defined (checked on a tiny weight, no model needed)."""
        return type(self).matricize is not Method.matricize

    def spectrum_shape(self, target: Target) -> tuple[int, int] | None:
        """Shape of the matrix :meth:`spectrum` takes singular values of (``None``: not a matrix spectrum)."""
        return target.matrix_shape if self.maskable else None

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

    def data_spectrum(self, target: Target, stats: Any) -> torch.Tensor:
        """The spectrum of the problem a data-aware method solves, from calibration ``stats``.

        Default: singular values of ``W (XXᵀ/n)^{1/2}`` — truncating it at ``r`` loses exactly
        ``Σ_{i>r} σ_i²`` of output energy ``‖(W − Ŵ)X‖²/n`` (the whitened problem of Zhang et al.,
        GreBdec eq. 3).  Computed as those of ``W F`` for a Cholesky factor ``F Fᵀ = XXᵀ/n + 10⁻¹⁰σ_max``
        (the same values, one ``k × k`` matrix instead of ``eigh``'s five).  Data-free methods ignore
        ``stats`` (their :meth:`spectrum`).
        """
        if not self.needs_data or stats is None:
            return self.spectrum(target)
        from ..decompose.svd import singular_values
        from ..linalg import psd_factor
        n = max(int(stats.n), 1)
        factor = psd_factor(lambda: stats.XX.to(torch.float64) / n, 1e-10)
        Z = factor.times(target.matrix)
        del factor
        # uncached: the SVD cache would keep every whitened matrix (never seen again) until the block is
        # built, 0.36 GB for a TinyLlama block
        return singular_values(Z, cache=False)

    def decompose(self, target: Target, rank: int, ctx: DecomposeContext) -> tuple[nn.Module, dict]:
        """The replacement module for ``target`` at knob ``rank`` and its JSON-able ``info``."""
        raise NotImplementedError

    def structure(self, module: nn.Module, info: dict) -> nn.Module:
        """An uninitialised replacement for ``module`` shaped as ``info`` says (used to reload)."""
        raise NotImplementedError


def ctx_weight(target: Target, ctx: "DecomposeContext | None") -> torch.Tensor:
    """The weight to decompose: ``ctx.weight`` when an allocator replaced it, else the target's own (detached)."""
    if ctx is not None and ctx.weight is not None:
        return ctx.weight
    return target.module.weight.detach()


def ctx_matrix(target: Target, ctx: "DecomposeContext | None") -> torch.Tensor:
    """:func:`ctx_weight` in the target's matrix view ``(out, in·kh·kw)``."""
    w = ctx_weight(target, ctx)
    return w.reshape(w.shape[0], -1)


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name`` everywhere (API, CLI, plans)."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """The registered method called ``name`` (configured with ``options`` when given); a clear error otherwise."""
    try:
        m = METHODS[name]
    except KeyError:
        import difflib
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RankslimError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(METHODS))}") from None
    return m.configure(options) if options is not None else m
