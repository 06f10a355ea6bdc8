"""Shared and tied layers: aliased modules, modules called twice, Parameters tied between layers.

Costs are measured independently of rankslim: parameters as ``sum(p.numel() for p in
model.parameters())`` (each Parameter object once), MACs with ``FlopCounterMode`` (FLOPs / 2).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankslim
from rankslim.cost import LayerShapes, model_cost, trace_shapes
from rankslim.surgery import module_names, replace_modules, select_targets


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fcm_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    x = torch.randn(1, *shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() // 2


class Aliased(nn.Module):
    """``b`` is another name for ``a`` (the same module object); forward uses the alias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.c = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.b(x)))))


class CalledTwice(nn.Module):
    """``a`` runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(x)))


class TiedWeights(nn.Module):
    """``b.weight`` is ``a.weight`` (one Parameter, two layers); ``c`` and ``e`` are ordinary."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.c = nn.Linear(64, 256)
        self.e = nn.Linear(256, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.e(torch.relu(self.c(x)))))


def _model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _reasons(result) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in result.report.skipped}


def test_aliased_module_is_compressed_once_and_stays_shared():
    model = _model(Aliased)
    before = n_params(model)
    res = rankslim.compress(model, params=0.5, input_shape=(64,))
    out = res.model
    assert out.a is out.b and not isinstance(out.a, nn.Linear)  # one new module under both names
    assert n_params(out) <= 0.5 * before
    assert res.report.compressed.params == n_params(out)
    assert res.report.original.macs == fcm_macs(model, (64,))
    assert res.report.compressed.macs == fcm_macs(out, (64,))
    assert "alias of 'a'" in _reasons(res)["b"]
    assert [r.name for r in res.report.rows if r.method != "dense"] == ["a", "c"]
    # the user's model is untouched, its alias included
    assert isinstance(model.a, nn.Linear) and model.a is model.b


def test_aliased_module_survives_save_and_load(tmp_path):
    res = rankslim.compress(_model(Aliased), params=0.5, input_shape=(64,))
    path = rankslim.save(res.model, tmp_path / "m.safetensors")
    back = rankslim.load(path, _model(Aliased))
    assert back.a is back.b and type(back.a) is type(res.model.a)
    x = torch.randn(3, 64)
    torch.testing.assert_close(back(x), res.model(x))


def test_module_called_twice_counts_macs_for_every_call():
    model = _model(CalledTwice)
    shape = (64,)
    measured = fcm_macs(model, shape)
    assert measured == 2 * 64 * 64 + 64 * 64 + 64 * 4  # a twice, c once, head once
    assert model_cost(model, shape).total.macs == measured
    assert trace_shapes(model, shape).n_calls("a") == 2
    res = rankslim.compress(model, macs=0.5, input_shape=shape)
    assert not isinstance(res.model.a, nn.Linear)
    assert res.report.original.macs == measured
    got = fcm_macs(res.model, shape)
    assert res.report.compressed.macs == got <= 0.5 * measured
    res = rankslim.compress(model, params=0.5, input_shape=shape)
    assert n_params(res.model) <= 0.5 * n_params(model)
    assert res.report.compressed.macs == fcm_macs(res.model, shape)


class VaryingCalls(nn.Module):
    """``a`` runs on 4 tokens, then on one vector: two calls with different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.c = nn.Linear(32, 128)
        self.head = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, 32)
        y = self.a(self.a(x).mean(1))
        return self.head(torch.relu(self.c(y)))


def test_module_called_with_different_shapes_is_skipped_with_reason():
    model = _model(VaryingCalls)
    shape = (4, 32)
    assert model_cost(model, shape).total.macs == fcm_macs(model, shape)  # 4 + 1 positions of `a`
    res = rankslim.compress(model, params=0.6, input_shape=shape)
    assert isinstance(res.model.a, nn.Linear)
    assert "different shapes" in _reasons(res)["a"]
    assert res.report.compressed.macs == fcm_macs(res.model, shape)
    assert n_params(res.model) <= 0.6 * n_params(model)


def test_tied_weight_layers_are_skipped_and_stay_tied():
    model = _model(TiedWeights)
    before = n_params(model)
    assert model_cost(model, (64,)).total.params == before  # the tied weight is counted once
    res = rankslim.compress(model, params=0.5, input_shape=(64,))
    reasons = _reasons(res)
    assert "weight tied with b.weight" in reasons["a"] and "weight tied with a.weight" in reasons["b"]
    out = res.model
    assert isinstance(out.a, nn.Linear) and isinstance(out.b, nn.Linear) and out.a.weight is out.b.weight
    assert not isinstance(out.c, nn.Linear) and not isinstance(out.e, nn.Linear)
    assert res.report.original.params == before
    assert n_params(out) <= 0.5 * before
    assert res.report.compressed.params == n_params(out)
    assert res.report.compressed.macs == fcm_macs(out, (64,))


class TiedHead(nn.Module):
    """Language-model style: the output projection shares the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.mid = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 100, bias=False)
        self.lm_head.weight = self.embed.weight


def test_head_tied_to_embedding_is_skipped():
    model = TiedHead()
    shapes = LayerShapes(inputs={"mid": (5, 32), "lm_head": (5, 32)}, outputs={"mid": (5, 32), "lm_head": (5, 100)},
                         calls={"mid": [((5, 32), (5, 32))], "lm_head": [((5, 32), (5, 100))]})
    targets, skipped = select_targets(model, shapes)
    assert [t.name for t in targets] == ["mid"]
    assert any(s.name == "lm_head" and "weight tied with embed.weight" in s.reason for s in skipped)


def test_replace_modules_replaces_every_name_of_the_object():
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential()
    model.add_module("first", block)
    model.add_module("again", block)  # a container registered twice: its children have two names each
    assert module_names(model, block[0]) == ["first.0", "again.0"]
    new = nn.Identity()
    replace_modules(model, {"first.0": new})
    assert model.first[0] is new and model.again[0] is new
