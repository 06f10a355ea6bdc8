"""Budgets measured on the BUILT model, never read back from the report.

Every method family and every budgeted allocator is run through the public ``rankslim.compress``;
the compressed module is then measured with ``tests/_measure.py`` (parameters counted on the
module, MACs by ``FlopCounterMode``, sparse layers at what a sparse kernel stores and multiplies)
and compared with the same measurement of the original model.  Methods that claim to be exact at
full rank must reproduce the original outputs.

Runs on the bundled trained zoo models (so spectra and calibration statistics are realistic) with
32 Fashion-MNIST calibration images and a few torchvision layers at 3x64x64.
"""
from __future__ import annotations

import fnmatch
import functools

import pytest
import torch
import torchvision
from torch import nn

import rankslim
from rankslim.cost import trace_shapes
from rankslim.data import load_dataset
from rankslim.surgery import select_targets
from rankslim.zoo import get_zoo_model

from ._measure import count_macs, count_params, masked_modules

SHAPE = (1, 28, 28)
CALIB = dict(data="fashion-mnist", calib_samples=32)
#: iterative solvers cut short: the tests measure budgets, not solution quality
METHOD_OPTIONS = {"ddlr": {"ddlr_solver": "admm", "ddlr_max_iter": 50}, "relu_admm": {"admm_max_iter": 30},
                  "cp": {"n_iter": 20}, "godec": {"godec_iters": 20}}
ALLOCATOR_OPTIONS = {"cobla": {"maxiter": 5}, "bayes": {"trials": 4}, "greedy-sensitivity": {"candidates": (0.25, 0.5)}}
BUDGETED = ["cptv", "pos-greedy", "pos-cvx", "cobla", "bayes", "greedy-sensitivity"]
BUDGET_FREE = ["vbmf", "gavish-donoho"]
#: families that always build masked layers (relu_admm's sparse part may come out empty, then it is plain low rank)
SPARSE = {"prune", "prune-data", "godec", "grebdec", "grebdec-ls"}
#: conv-only families: Linear layers (and 1x1 convs for spatial/cp) get svd
CONV_ONLY = {"spatial", "tucker", "cp"}


@functools.lru_cache(maxsize=None)
def _test_images(n: int = 8) -> torch.Tensor:
    return load_dataset("fashion-mnist", "test").tensors[0][:n].clone()


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> tuple[int, int]:
    """Measured (params, MACs per sample) of the untouched zoo model."""
    model = get_zoo_model(name)
    return count_params(model), count_macs(model, _test_images(2))


@functools.lru_cache(maxsize=None)
def _layer_names(name: str) -> frozenset[str]:
    return frozenset(n for n, m in get_zoo_model(name).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def _replaced(model: nn.Module, name: str) -> set[str]:
    """Conv2d/Linear layers of zoo model ``name`` that ``model`` holds as some other module (factorized)."""
    mods = dict(model.named_modules())
    return {n for n in _layer_names(name) if not isinstance(mods[n], (nn.Conv2d, nn.Linear))}


def _check_measured(res: rankslim.CompressionResult, name: str, params: float | None, macs: float | None
                    ) -> tuple[float, float]:
    """Assert the built model meets the budgets by measurement and runs; return the measured fractions."""
    p0, m0 = _reference(name)
    p1, m1 = count_params(res.model), count_macs(res.model, _test_images(2))
    if params is not None:
        assert p1 <= params * p0, f"{p1} params measured, budget {params} x {p0}"
    if macs is not None:
        assert m1 <= macs * m0, f"{m1} MACs measured, budget {macs} x {m0}"
    assert _replaced(res.model, name), "nothing was factorized"
    with torch.no_grad():
        out = res.model(_test_images())
    assert out.shape == (8, 10) and bool(torch.isfinite(out).all())
    return p1 / p0, m1 / m0


@pytest.mark.parametrize("method", sorted(rankslim.METHODS))
def test_every_method_meets_both_budgets_on_lenet5(method):
    methods = {"fc*": "svd"} if method in CONV_ONLY else None
    include = ["fc*"] if method == "tt" else None  # TT is for Linear layers only
    # the Linear layers of LeNet-5 are 14% of its MACs: TT can meet a params budget, the MAC one only loosely
    params, macs = (0.5, 0.95) if method == "tt" else (0.5, 0.5)
    res = rankslim.compress("zoo:lenet5", method, methods=methods, include=include, params=params, macs=macs,
                            method_options=METHOD_OPTIONS.get(method), **CALIB)
    _check_measured(res, "lenet5", params, macs)
    if method in SPARSE:
        # the sparse counting path of the helpers was really taken
        assert masked_modules(res.model)
    if method in CONV_ONLY:
        assert {"conv1", "conv2"} & _replaced(res.model, "lenet5")


@pytest.mark.parametrize("alloc", BUDGETED)
@pytest.mark.parametrize("method,budget", [("svd", (0.5, 0.5)), ("svd", (0.35, None)), ("spatial", (0.4, 0.4))],
                         ids=["svd-both", "svd-params", "spatial-both"])
def test_budgeted_allocators_meet_measured_budgets(alloc, method, budget):
    params, macs = budget
    methods = {"fc*": "svd"} if method == "spatial" else None
    res = rankslim.compress("zoo:lenet5", method, methods=methods, allocator=alloc, params=params, macs=macs,
                            allocator_options=ALLOCATOR_OPTIONS.get(alloc), **CALIB)
    _check_measured(res, "lenet5", params, macs)


@pytest.mark.parametrize("alloc", BUDGET_FREE)
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_budget_free_allocators_build_a_working_model(alloc, name):
    res = rankslim.compress(f"zoo:{name}", "svd", allocator=alloc)
    frac_params, _ = _check_measured(res, name, None, None)
    assert frac_params < 1.0


# ResNet-20 (BatchNorm, residual adds, 1x1 shortcuts): one allocator per family kind, data-aware included
@pytest.mark.parametrize("method,alloc", [("svd", "cptv"), ("tucker", "pos-cvx"), ("spatial", "pos-greedy"),
                                          ("cp", "cptv"), ("prune", "cptv"), ("zhang", "cptv")])
def test_resnet20_meets_measured_budgets(method, alloc):
    methods = {"fc": "svd", "*shortcut*": "svd"} if method in CONV_ONLY else None
    res = rankslim.compress("zoo:resnet20", method, methods=methods, allocator=alloc, params=0.5, macs=0.5,
                            method_options=METHOD_OPTIONS.get(method), data="fashion-mnist", calib_samples=16)
    _check_measured(res, "resnet20", 0.5, 0.5)


def test_sparse_layers_on_torchvision_mobilenet():
    """Pruned layers are measured at what a sparse kernel stores/multiplies, on a real torchvision net."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    shape = (3, 64, 64)
    x = torch.randn(2, *shape)
    p0, m0 = count_params(model), count_macs(model, x)
    res = rankslim.compress(model, "prune", params=0.6, macs=0.6, input_shape=shape)
    assert masked_modules(res.model)
    assert count_params(res.model) <= 0.6 * p0
    assert count_macs(res.model, x) <= 0.6 * m0
    with torch.no_grad():
        assert bool(torch.isfinite(res.model(x)).all())


#: LeNet-5's classifier: left out of the full-rank runs (compress keeps an output head dense by default)
HEAD = ["fc3"]


def _full_ranks(method: str, methods: dict[str, str] | None, include: list[str] | None) -> dict[str, int]:
    """The top of each target's rank knob (what the method defines as full rank)."""
    model = get_zoo_model("lenet5")
    targets, _ = select_targets(model, trace_shapes(model, SHAPE), include, HEAD)
    out = {}
    for t in targets:
        m = rankslim.get_method(next((v for k, v in (methods or {}).items() if fnmatch.fnmatchcase(t.name, k)), method))
        if m.supports(t) is None:
            out[t.name] = m.max_rank(t)
    return out


@pytest.mark.parametrize("method", ["svd", "spatial", "tucker", "tt", "zhang"])
def test_full_rank_reproduces_the_original(method):
    """Methods exact at the top of their knob (for zhang: with Y = W X the ridge minimiser is W itself)."""
    methods = {"fc*": "svd"} if method in CONV_ONLY else None
    include = ["fc*"] if method == "tt" else None
    ranks = _full_ranks(method, methods, include)
    res = rankslim.compress("zoo:lenet5", method, methods=methods, include=include, exclude=HEAD, ranks=ranks,
                            **CALIB)
    assert ranks and set(ranks) <= _replaced(res.model, "lenet5")  # every layer really factorized
    x = _test_images()
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), get_zoo_model("lenet5")(x), rtol=1e-4, atol=1e-4)


class _ReusedLayer(nn.Module):
    """One Linear applied twice per forward pass (weight sharing across depth), then a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(torch.relu(self.a(x)))))


def test_mac_budget_of_a_reused_layer_is_reachable():
    """Every call of a reused layer is costed: its 2nd call is not a fixed cost the allocator cannot touch."""
    torch.manual_seed(0)
    model = _ReusedLayer().eval()
    x = torch.randn(2, 64)
    m0 = count_macs(model, x)
    # measured: at rank 1 both calls of `a` are cheap, about 10% of the MACs remain
    low = rankslim.compress(model, ranks={"a": 1}, input_shape=(64,))
    assert count_macs(low.model, x) <= 0.2 * m0
    res = rankslim.compress(model, macs=0.5, input_shape=(64,))
    assert count_macs(res.model, x) <= 0.5 * m0
