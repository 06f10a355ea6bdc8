"""Fast calibration (fx frontiers) equals the per-layer reference; the SVD cache is exact and invalidated by edits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankslim.calibrate import Calibrator
from rankslim.cost import trace_shapes
from rankslim.decompose import svd as svdmod
from rankslim.decompose.svd import SVD_CACHE, clear_svd_cache, set_svd_cache_limit, singular_values, truncated_svd
from rankslim.errors import OptionError
from rankslim.surgery import replace_modules, select_targets


class Block(nn.Module):
    """A residual block with an in-place add and an in-place ReLU (frontiers must not be edited twice)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(c, 3 * c, 1)  # k < m: the Gram route in sequential mode
        self.conv2 = nn.Conv2d(3 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.conv1(x)))
        out = self.conv2(torch.relu(self.expand(out)))
        out += x
        return torch.relu(out)


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


class Twice(nn.Module):
    """``fc1`` is called twice, with another target (``fc2``) between its two calls; inputs are token sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.up = nn.Linear(6, 24)  # an expansion (k < m): the fast scheme's Gram route in sequential mode
        self.fc3 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = self.fc2(x)
        x = self.fc1(torch.tanh(x))
        return self.fc3(torch.relu(self.up(x)))


class Branchy(Twice):
    """Data-dependent control flow: fx cannot trace it, so the fast scheme must fall back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if float(x.sum()) > 0:
            x = -x
        return self.fc3(self.up(self.fc2(x)))


def _model(kind: str) -> tuple[nn.Module, tuple[int, ...], list[torch.Tensor]]:
    torch.manual_seed(0)
    if kind == "resnet":
        m, shape = ResNetish(), (3, 8, 8)
    else:
        m, shape = (Twice() if kind == "twice" else Branchy()), (5, 6)
    m.eval()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    batches = [torch.randn(3, *shape), torch.randn(4, *shape), torch.randn(2, *shape)]
    return m, shape, batches


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """A visibly different layer standing in for the compressed one."""
    new = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new.weight.mul_(0.6).add_(0.1 * torch.randn(new.weight.shape, generator=g))
    return new


def _sweep(model, shape, batches, scheme, *, sequential=True, edit_after=None, **kw):
    """What build() does: statistics of each target in forward order, then swap in its 'compressed' layer."""
    work = copy.deepcopy(model)
    targets = select_targets(work, trace_shapes(work, shape))[0]
    cal = Calibrator(model, batches, sequential=sequential, scheme=scheme, **kw)
    out = []
    for j, t in enumerate(targets):
        out.append(cal.stats_for(t, work, raw=kw.get("raw_columns") is not None))
        replace_modules(work, {t.name: _perturbed(t.module, j)})
        if edit_after == j:
            with torch.no_grad():  # an in-place edit of the first layer, which the frontiers already passed
                work.get_submodule(targets[0].name).weight.mul_(-2.0)
    return out, cal, work


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= 1e-8 * scale


def _assert_same(fast, ref):
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref):
        assert f.name == r.name and f.n == r.n
        for field in ("XX", "YX", "x_sum", "y_sum"):
            assert _close(getattr(f, field), getattr(r, field)), (f.name, field)
        assert abs(f.yy - r.yy) <= 1e-8 * abs(r.yy)
        if r.X is not None:
            assert _close(f.X, r.X) and _close(f.Y, r.Y)


@pytest.mark.parametrize("kind", ["resnet", "twice"])
@pytest.mark.parametrize("sequential", [True, False])
def test_fast_equals_per_layer(kind, sequential):
    model, shape, batches = _model(kind)
    fast, cal, _ = _sweep(model, shape, batches, "fast", sequential=sequential)
    ref, _, _ = _sweep(model, shape, batches, "per-layer", sequential=sequential)
    assert cal.scheme_used == "fast"
    _assert_same(fast, ref)
    if sequential:  # the sequential inputs really differ from the original ones (the test can fail)
        orig, _, _ = _sweep(model, shape, batches, "per-layer", sequential=False)
        assert not _close(fast[-1].XX, orig[-1].XX)


def test_fast_equals_per_layer_sampled_positions_and_raw_columns():
    model, shape, batches = _model("resnet")
    kw = dict(max_positions=7, raw_columns=40)
    _assert_same(_sweep(model, shape, batches, "fast", **kw)[0], _sweep(model, shape, batches, "per-layer", **kw)[0])


def test_frontiers_over_the_memory_limit_are_recomputed():
    model, shape, batches = _model("resnet")
    fast, cal, _ = _sweep(model, shape, batches, "fast", cache_limit_bytes=3000)
    ref, _, _ = _sweep(model, shape, batches, "per-layer")
    _assert_same(fast, ref)
    assert cal.scheme_used == "fast" and cal.peak_frontier_bytes <= 3000


def test_in_place_edit_behind_the_frontier_is_seen():
    model, shape, batches = _model("resnet")
    fast, cal, _ = _sweep(model, shape, batches, "fast", edit_after=1)
    ref, _, _ = _sweep(model, shape, batches, "per-layer", edit_after=1)
    _assert_same(fast, ref)
    assert cal.restarts > 0


def test_out_of_order_requests_and_a_new_work_model():
    model, shape, batches = _model("resnet")
    work = copy.deepcopy(model)
    targets = select_targets(work, trace_shapes(work, shape))[0]
    fast = Calibrator(model, batches, scheme="fast")
    ref = Calibrator(model, batches, scheme="per-layer")
    replace_modules(work, {targets[0].name: _perturbed(targets[0].module, 0)})
    for t in [targets[3], targets[1], targets[2]]:
        _assert_same([fast.stats_for(t, work)], [ref.stats_for(t, work)])
    other = copy.deepcopy(model)  # a different work model (allocators build candidates on copies)
    t = select_targets(other, trace_shapes(other, shape))[0][2]
    _assert_same([fast.stats_for(t, other)], [ref.stats_for(t, other)])


def test_untraceable_model_falls_back():
    model, shape, batches = _model("branchy")
    fast, cal, _ = _sweep(model, shape, batches, "fast")
    ref, _, _ = _sweep(model, shape, batches, "per-layer")
    assert cal.scheme_used == "per-layer" and cal.fallback_reason
    _assert_same(fast, ref)


def test_fast_scheme_runs_each_batch_through_the_model_once():
    """Forward calls of a module that is never replaced, counted by a hook on the work model."""
    model, shape, batches = _model("resnet")
    counts = {}
    for scheme in ("fast", "per-layer"):
        work = copy.deepcopy(model)
        targets = select_targets(work, trace_shapes(work, shape))[0]
        calls = []
        work.stem_bn.register_forward_hook(lambda *_: calls.append(1))
        cal = Calibrator(model, batches, scheme=scheme)
        for j, t in enumerate(targets):
            cal.stats_for(t, work)
            replace_modules(work, {t.name: _perturbed(t.module, j)})
        counts[scheme] = len(calls)
    assert len(targets) >= 5
    assert counts["fast"] == len(batches)
    assert counts["per-layer"] >= (len(targets) - 1) * len(batches)


def test_unknown_scheme_is_refused():
    model, _, batches = _model("twice")
    with pytest.raises(OptionError, match="scheme"):
        Calibrator(model, batches, scheme="quick")


# ------------------------------------------------------------------------------------------ SVD cache


@pytest.fixture
def cache():
    set_svd_cache_limit(2**30)
    clear_svd_cache()
    yield SVD_CACHE
    clear_svd_cache()
    set_svd_cache_limit(svdmod.SVD_CACHE_BYTES)


class _CountingLinalg:
    """Counts calls of the LAPACK routines the SVD module may use (an independent measure of 'one SVD')."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for fn in ("svd", "svdvals", "eigh", "eigvalsh"):
            real = getattr(torch.linalg, fn)

            def wrapped(*a, _real=real, **k):
                self.calls += 1
                return _real(*a, **k)
            monkeypatch.setattr(torch.linalg, fn, wrapped)


@pytest.mark.parametrize("shape,rank", [((40, 90), 7), ((1200, 1800), 300)])
def test_svd_cache_identical_and_one_decomposition(cache, monkeypatch, shape, rank):
    torch.manual_seed(1)
    lin = nn.Linear(shape[1], shape[0])
    W = lin.weight.detach()
    set_svd_cache_limit(0)
    s_ref, f_ref = singular_values(W), truncated_svd(W, rank)
    set_svd_cache_limit(2**30)
    counter = _CountingLinalg(monkeypatch)
    s1 = singular_values(lin.weight.detach())        # a fresh view of the same weight, as Target.matrix gives
    first = counter.calls
    f1 = truncated_svd(lin.weight.detach(), rank)
    if shape == (40, 90):
        assert counter.calls == first == 1                # the spectrum's SVD serves the decomposition
    assert torch.equal(s1, s_ref) and torch.equal(f1.U, f_ref.U) and torch.equal(f1.V, f_ref.V)
    again = counter.calls
    assert torch.equal(truncated_svd(W, rank).U, f_ref.U) and counter.calls == again


@pytest.mark.parametrize("edit", ["in-place", "data"])
def test_svd_cache_invalidated_by_weight_edits(cache, edit):
    torch.manual_seed(2)
    lin = nn.Linear(30, 20)
    before = singular_values(lin.weight.detach())
    with torch.no_grad():
        if edit == "in-place":
            lin.weight[0].mul_(3.0)
        else:
            lin.weight.data[0].mul_(3.0)                 # does not move the version counter
    after = singular_values(lin.weight.detach())
    fresh = torch.linalg.svdvals(lin.weight.detach().double())
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh, rtol=1e-10)
    f = truncated_svd(lin.weight.detach(), 20)
    assert torch.allclose(f.U @ f.V, lin.weight.detach(), atol=1e-5)


def test_svd_cache_is_bounded(cache):
    set_svd_cache_limit(60_000)
    for seed in range(6):
        torch.manual_seed(seed)
        singular_values(torch.randn(40, 50))
    held = sum(e.nbytes for e in cache._entries.values())
    assert 0 < held <= 60_000 and len(cache._entries) < 6
