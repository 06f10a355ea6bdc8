"""Truncated SVD, exact or randomized (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

The GreBdec paper's section 3 notes that SVD is the special case of W = L + S with S = 0 and
data-independent reconstruction: ``min ||W - L||_F s.t. rank(L) <= r`` is solved by keeping the
``r`` largest singular triplets (Eckart-Young).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import RankError
from ..linalg import gram_svd, range_finder

#: Matrices with at least this many entries avoid LAPACK's full SVD, which is the slow part
#: (``svdvals`` of a 4096 x 25088 matrix: ~80 s on two cores).  Small ranks (under
#: ``RANDOMIZED_MAX_RANK_FRACTION`` of the smaller side) use the randomized range finder; other
#: ranks use the eigendecomposition of the smaller Gram matrix in float64 (~15 s for the same
#: matrix).  The Gram route squares the condition number, so singular values below ~1e-8 of
#: the largest lose relative accuracy; truncation never keeps those.
LARGE_MIN_ENTRIES = 2_000_000
RANDOMIZED_MAX_RANK_FRACTION = 0.1


#: default bound of the decomposition cache (bytes of float64 factors plus the weight copies that key them)
SVD_CACHE_BYTES = 2**30


@dataclass
class _Entry:
    """One cached decomposition: ``W`` (a copy, to check content), its ``_version`` when cached, and either the
    exact SVD ``(U, S, Vh)`` or the smaller Gram matrix ``G`` with its eigenvalues (and, once needed, ``eigh``)."""

    W: torch.Tensor
    version: int
    usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    G: torch.Tensor | None = None
    gram_values: torch.Tensor | None = None
    eig: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        ts = [self.W, self.G, self.gram_values, *(self.usv or ()), *(self.eig or ())]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class SVDCache:
    """A bounded LRU of weight decompositions, so the spectrum (allocation) and the factors (decomposition)
    of one weight come from one SVD.

    Keyed on the tensor's address, shape, strides, dtype and device; an entry answers only when the
    tensor's version counter is unchanged (in-place edits move it) AND its content equals the copy kept
    with the entry (edits through ``.data`` do not move the counter, and a freed weight's address may
    be reused by another tensor).  Results are float64 and identical to the uncached computation.
    """

    def __init__(self, limit_bytes: int = SVD_CACHE_BYTES) -> None:
        self.limit_bytes = int(limit_bytes)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(W: torch.Tensor) -> tuple:
        return (str(W.device), W.dtype, tuple(W.shape), tuple(W.stride()), W.data_ptr())

    def get(self, W: torch.Tensor) -> _Entry | None:
        """The entry of ``W`` if it is still valid (moved to most recent), else ``None``."""
        if self.limit_bytes <= 0:
            return None
        k = self.key(W)
        with self._lock:
            e = self._entries.get(k)
            if e is None:
                return None
            if e.version != W._version or not torch.equal(e.W, W.detach()):
                del self._entries[k]
                return None
            self._entries.move_to_end(k)
            return e

    def entry(self, W: torch.Tensor) -> _Entry:
        """The (possibly empty) entry of ``W``, created and stored if missing; a hit is counted by the caller."""
        e = self.get(W)
        if e is not None:
            return e
        return _Entry(W.detach().clone(), W._version)

    def put(self, W: torch.Tensor, e: _Entry) -> None:
        """Store ``e`` for ``W``, evicting least recently used entries; too big an entry is not kept."""
        if self.limit_bytes <= 0 or e.nbytes > self.limit_bytes:
            return
        k = self.key(W)
        with self._lock:
            self._entries[k] = e
            self._entries.move_to_end(k)
            while sum(x.nbytes for x in self._entries.values()) > self.limit_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def info(self) -> dict[str, int]:
        """``hits``, ``misses``, ``entries`` and ``bytes`` held."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                    "bytes": sum(x.nbytes for x in self._entries.values())}


#: the process-wide cache used by :func:`truncated_svd` and :func:`singular_values`
SVD_CACHE = SVDCache()


def clear_svd_cache() -> None:
    """Forget every cached decomposition (and the hit/miss counts)."""
    SVD_CACHE.clear()


def set_svd_cache_limit(limit_bytes: int) -> None:
    """Bound the decomposition cache to ``limit_bytes`` (0 turns it off); entries over the bound are dropped."""
    SVD_CACHE.limit_bytes = int(limit_bytes)
    if limit_bytes <= 0:
        SVD_CACHE.clear()


def _exact_usv(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``W`` in float64, from the cache when ``W`` was decomposed before."""
    e = SVD_CACHE.entry(W)
    if e.usv is not None:
        SVD_CACHE.hits += 1
        return e.usv
    SVD_CACHE.misses += 1
    e.usv = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    SVD_CACHE.put(W, e)
    return e.usv


def _gram_entry(W: torch.Tensor, need_eig: bool) -> _Entry:
    """The cached smaller Gram matrix of ``W`` (float64) and, with ``need_eig``, its ``eigh``."""
    e = SVD_CACHE.entry(W)
    if e.G is not None and (e.eig is not None if need_eig else e.gram_values is not None):
        SVD_CACHE.hits += 1
        return e
    SVD_CACHE.misses += 1
    if e.G is None:
        W64 = W.detach().to(torch.float64)
        e.G = W64 @ W64.T if W64.shape[0] <= W64.shape[1] else W64.T @ W64
    if need_eig:
        e.eig = torch.linalg.eigh(e.G)
    else:
        e.gram_values = torch.linalg.eigvalsh(e.G)
    SVD_CACHE.put(W, e)
    return e


@dataclass
class LowRankFactors:
    """``W ≈ U @ V`` with ``U: (m, r)`` and ``V: (r, n)``; singular values split as sqrt on both sides.

    ``solver`` says which algorithm produced them ("exact" or "randomized").
    """

    U: torch.Tensor
    V: torch.Tensor
    solver: str

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


SOLVERS = ("auto", "exact", "gram", "randomized")


def choose_solver(shape: tuple[int, int], rank: int, solver: str = "auto") -> str:
    """Pick "exact", "gram" or "randomized" for a ``shape`` matrix truncated to ``rank``."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver
    m, n = shape
    if m * n < LARGE_MIN_ENTRIES:
        return "exact"
    return "randomized" if rank < RANDOMIZED_MAX_RANK_FRACTION * min(m, n) else "gram"


def randomized_svd(
    W: torch.Tensor, rank: int, oversample: int = 10, n_iter: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``W: (m, n)``: returns ``U: (m, rank)``, ``S: (rank,)``, ``Vh: (rank, n)``.

    :func:`~rankslim.linalg.range_finder` with ``n_iter`` QR-stabilised power iterations and
    ``oversample`` extra columns, then the exact SVD of the small projected matrix.
    """
    m, n = W.shape
    Q = range_finder(W, min(rank + oversample, m, n), passes=2 * n_iter + 1, generator=generator)
    B = Q.T @ W
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def truncated_svd(
    W: torch.Tensor, rank: int, solver: str = "auto", generator: torch.Generator | None = None
) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``W: (m, n)`` as ``U: (m, r) @ V: (r, n)``.

    Computed in float64 for accuracy and returned in ``W``'s dtype.
    Raises :class:`RankError` if ``rank`` is not in ``[1, min(m, n)]``.
    """
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise RankError(f"rank {rank} is impossible for a {m}x{n} matrix: it must lie in [1, {min(m, n)}]")
    used = choose_solver((m, n), rank, solver)
    W64 = W.detach().to(torch.float64)
    if used == "randomized":
        U, S, Vh = randomized_svd(W64, rank, generator=generator)
    elif used == "gram":
        U, S, Vh = gram_svd(W64, rank, eig=_gram_entry(W, need_eig=True).eig)
    else:
        U, S, Vh = _exact_usv(W)  # the full SVD, shared with singular_values (one SVD per weight)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    root = S.sqrt()
    return LowRankFactors((U * root).to(W.dtype), (root[:, None] * Vh).to(W.dtype), used)


def singular_values(W: torch.Tensor, cache: bool = True) -> torch.Tensor:
    """Singular values of ``W: (m, n)`` in descending order, float64, shape ``(min(m, n),)``.

    Large matrices (see :data:`LARGE_MIN_ENTRIES`) go through the smaller Gram matrix.  Small ones
    compute the whole thin SVD (about the cost of ``svdvals`` on CPU) and cache it, so that
    :func:`truncated_svd` of the same weight reuses it; large ones cache the Gram matrix.
    ``cache=False`` for a matrix that is never decomposed afterwards (a whitened weight): nothing is kept.
    """
    m, n = W.shape
    if not cache:
        W64 = W.detach().to(torch.float64)
        return torch.linalg.svdvals(W64) if m * n < LARGE_MIN_ENTRIES else gram_svd(W64, left=False, right=False)[1]
    if m * n < LARGE_MIN_ENTRIES:
        return _exact_usv(W)[1].clone()
    e = _gram_entry(W, need_eig=False)
    if e.gram_values is None:  # only eigh was cached: eigvalsh keeps the values identical to an uncached call
        e.gram_values = torch.linalg.eigvalsh(e.G)
    return e.gram_values.flip(0).clamp_min(0).sqrt()


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(sigma[:r]**2) >= energy * sum(sigma**2)`` (at least 1).

    ``sigma``: descending singular values ``(k,)``; ``energy`` in ``[0, 1]``.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must lie in [0, 1], got {energy}")
    e = sigma.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # tolerance so that energy=1.0 does not overshoot through rounding
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(r, sigma.numel()))


__all__ = ["LowRankFactors", "SOLVERS", "SVDCache", "SVD_CACHE", "SVD_CACHE_BYTES", "clear_svd_cache",
           "set_svd_cache_limit", "choose_solver", "gram_svd", "randomized_svd", "truncated_svd",
           "singular_values", "energy_rank", "LARGE_MIN_ENTRIES", "RANDOMIZED_MAX_RANK_FRACTION"]
