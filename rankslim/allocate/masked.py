"""Masked singular values: the network as a function of COBLA's masking variables ``m``.

COBLA (Li & Shi, ECCV 2018, eqs. 3-4) writes every decomposed weight as a sum over the singular
triplets of one matricization of the kernel, each switched by a mask ``m_ij``:

    W_i(m_i) = unmat( sum_j m_ij * sigma_ij * U_ij V_ij^T )

* ``svd`` (eq. 4, Zhang et al.'s channel scheme): the matricization is the im2col view
  ``W.reshape(out, in * kh * kw)``;
* ``spatial`` (eq. 3, Tai et al.'s vertical/horizontal scheme): Tai's rearrangement
  ``T[W]: (C * kh, N * kw)`` (:func:`rankslim.decompose.spatial.spatial_matrix`).

:class:`SpectralNet` evaluates the *original* model with the target weights replaced by
``W_i(m_i)`` (``torch.func.functional_call``, so the user's modules are never touched); the masks
may be any real vectors (relaxed masks in [0, 1] for COBLA, 0/1 prefixes for "rank r").  At a 0/1
prefix mask of length ``r`` the replaced weight equals the rank-``r`` truncation the method would
build, so the outputs equal those of the compressed model up to float32 rounding — which makes
rank search cheap (one SVD per layer, no rebuild per candidate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import BudgetError

def require_maskable(methods: Mapping[str, Any], allocator: str) -> None:
    """Raise :class:`BudgetError` unless every target's method masks the spectrum of one matricization.

    ``methods``: target name -> configured :class:`~rankslim.methods.Method` (its ``maskable`` capability).
    """
    bad = sorted({m.name for m in methods.values() if not m.maskable})
    if bad:
        raise BudgetError(
            f"the {allocator} allocator masks the singular values of one matricization of each weight "
            f"(COBLA eqs. 3-4), which methods {bad} do not have. Use a spectrum-masking method such as svd or "
            "spatial (methods={glob: 'svd'} for the others) or a spectrum-only allocator (cptv, pos-greedy, pos-cvx)")


@dataclass
class LayerSpectrum:
    """SVD of one target's matricized weight: ``M = U diag(sigma) V^T``.

    ``U: (a, k)``, ``sigma: (k,)`` descending, ``V: (b, k)`` (float32, for the forward pass),
    ``shape``: the weight's shape, ``method``: the configured method whose matricization this is.
    """

    name: str
    method: Any
    shape: torch.Size
    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.sigma.numel())

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        """``unmat(U diag(scale * sigma) V^T)`` for ``scale: (k,)`` (differentiable in ``scale``)."""
        M = (self.U * (scale.to(self.U.dtype) * self.sigma)) @ self.V.T
        return self.method.unmatricize(M, self.shape)


def layer_spectrum(name: str, weight: torch.Tensor, method: Any) -> LayerSpectrum:
    """SVD (float64, stored float32) of ``weight`` matricized as ``method.matricize`` prescribes."""
    M = method.matricize(weight.detach().to(torch.float64))
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return LayerSpectrum(name, method, weight.shape, U.float().contiguous(), s.float(), Vh.T.float().contiguous())


def prefix_mask(k: int, r: int | None) -> torch.Tensor:
    """0/1 mask keeping the first ``r`` of ``k`` singular values (``None``: all, the dense layer)."""
    m = torch.zeros(k)
    m[: k if r is None else int(r)] = 1.0
    return m


class SpectralNet:
    """``model`` with each target weight a function of a per-singular-value scale vector.

    ``targets``: :class:`rankslim.surgery.Target` objects of ``model``; ``methods``: target name
    -> configured spectrum-masking method.  The model is run in eval mode (BatchNorm running statistics).
    """

    def __init__(self, model: nn.Module, targets: Sequence, methods: Mapping[str, Any]) -> None:
        require_maskable({t.name: methods[t.name] for t in targets}, "masked-spectrum")
        self.model = model
        self.layers = [layer_spectrum(t.name, t.module.weight, methods[t.name]) for t in targets]
        self.by_name = {ls.name: ls for ls in self.layers}

    def forward(self, x: torch.Tensor, scales: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Outputs of the model on ``x`` with every layer in ``scales`` replaced by its scaled weight
        (layers missing from ``scales`` keep their original weight)."""
        from torch.func import functional_call
        params = {f"{n}.weight": self.by_name[n].weight(s) for n, s in scales.items()}
        was = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, params, (x,), strict=False)
        finally:
            self.model.train(was)

    def rank_scales(self, ranks: Mapping[str, "int | None"]) -> dict[str, torch.Tensor]:
        """Prefix masks for ``ranks`` (``None`` layers are left at their original weight)."""
        return {ls.name: prefix_mask(ls.k, ranks[ls.name]) for ls in self.layers if ranks.get(ls.name) is not None}

    @torch.no_grad()
    def predict(self, batches: Sequence[torch.Tensor], ranks: Mapping[str, "int | None"]) -> torch.Tensor:
        """Top-1 predictions (concatenated over ``batches``) of the model truncated to ``ranks``."""
        sc = self.rank_scales(ranks)
        return torch.cat([self.forward(x, sc).argmax(dim=1) for x in batches])


@torch.no_grad()
def reference_logits(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of the untouched ``model`` (eval mode) on every batch: the targets of label-free losses."""
    was = model.training
    model.eval()
    try:
        return [model(x) for x in batches]
    finally:
        model.train(was)


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor, method: Any) -> torch.Tensor:
    """``unmat(U diag(scale * sigma) V^T)``: ``weight`` with its spectrum rescaled (same shape and dtype).

    How COBLA's singular-value scaling (``P_j <- m_hat_j P_j``, zero outside ``S_sigma``) reaches the
    decomposition: the build stage hands this weight to the method (``DecomposeContext.weight``); it
    has rank ``count_nonzero(scale)``, so the method's truncated SVD at that rank reproduces it exactly.
    ``scale: (min(M.shape),)`` for the matricization ``M = method.matricize(weight)``.
    """
    M = method.matricize(weight.detach().to(torch.float64))
    if scale.numel() != min(M.shape):
        raise BudgetError(f"{scale.numel()} singular-value scales for a weight with {min(M.shape)} singular values")
    U, sig, Vh = torch.linalg.svd(M, full_matrices=False)
    return method.unmatricize((U * (scale.to(torch.float64) * sig)) @ Vh, weight.shape).to(weight.dtype)


__all__ = ["LayerSpectrum", "SpectralNet", "scaled_weight", "layer_spectrum",
           "prefix_mask", "reference_logits", "require_maskable"]
