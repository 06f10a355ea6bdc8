"""Options are declared per method and per allocator, validated before any work starts, never silently ignored."""
from __future__ import annotations

import pytest

import rankslim
from rankslim.allocate import ALLOCATORS, get_allocator
from rankslim.errors import BudgetError, OptionError, RankError
from rankslim.methods import METHODS, get_method
from rankslim.options import Opt, either, float_, int_, optional, validate


def test_validate_types_defaults_and_typos():
    spec = (Opt("t", float_, -2.0, "x"), Opt("iters", int_, 10, "y"), Opt("eta", optional(either(float_, "auto")), None, "z"))
    assert validate(spec, None, "m") == {"t": -2.0, "iters": 10, "eta": None}
    assert validate(spec, {"t": "-1", "iters": "5", "eta": "auto"}, "m") == {"t": -1.0, "iters": 5, "eta": "auto"}
    with pytest.raises(OptionError, match="did you mean 'iters'"):
        validate(spec, {"iter": 3}, "m")
    with pytest.raises(OptionError, match="expected an integer"):
        validate(spec, {"iters": 2.5}, "m")
    with pytest.raises(OptionError, match="finite"):
        validate(spec, {"t": float("nan")}, "m")


def test_every_registered_method_and_allocator_declares_help():
    for m in METHODS.values():
        for o in m.options:
            assert o.help and o.name
        assert m.configure(None).config == {o.name: o.default for o in m.options}
    for a in ALLOCATORS.values():
        assert a.description and all(o.help for o in a.options)


def test_configured_instances_do_not_share_options():
    a = get_method("zhang", {"damping": 0.5})
    b = get_method("zhang")
    assert a.config["damping"] == 0.5 and b.config["damping"] == 1e-4
    assert METHODS["zhang"].config["damping"] == 1e-4


def test_typo_in_method_option_is_refused_before_work(tiny_net, monkeypatch):
    # nothing may run: the select stage would trace the model
    calls = []
    monkeypatch.setattr(rankslim.pipeline, "trace_shapes", lambda *a, **k: calls.append(1))
    with pytest.raises(OptionError, match="method 'svd' has no option 'foo'"):
        rankslim.compress(tiny_net, "svd", params=0.5, input_shape=(1, 8, 8), method_options={"foo": 1})
    with pytest.raises(OptionError, match="did you mean 'damping'"):
        rankslim.compress(tiny_net, "zhang", params=0.5, input_shape=(1, 8, 8), method_options={"dampin": 1})
    assert not calls


def test_per_method_options_do_not_leak(tiny_net):
    """grebdec's S step ``eta`` (1e-3) must not reach prune-data's IHT step on another layer."""
    from rankslim.pipeline import split_method_options
    split = split_method_options("grebdec", {"eta": 0.01, "prune-data.eta": "auto", "zhang": {"damping": 1e-3}})
    assert split == {"grebdec": {"eta": 0.01}, "prune-data": {"eta": "auto"}, "zhang": {"damping": 1e-3}}
    with pytest.raises(OptionError, match="no layer uses"):
        rankslim.compress(tiny_net, "svd", params=0.5, input_shape=(1, 8, 8), method_options={"zhang.damping": 1e-3})
    with pytest.raises(OptionError, match="names no method"):
        rankslim.compress(tiny_net, "svd", params=0.5, input_shape=(1, 8, 8), method_options={"nope.x": 1})


def test_allocator_options_validated_and_conflicts_refused(tiny_net):
    with pytest.raises(OptionError, match="allocator 'cptv' has no option 'maxiter'"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), allocator_options={"maxiter": 3})
    with pytest.raises(OptionError, match="unknown allocator 'cbla'.*did you mean 'cobla'"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), allocator="cbla")
    with pytest.raises(BudgetError, match="cannot be combined with allocator"):
        rankslim.compress(tiny_net, ratio=0.5, allocator="cobla", input_shape=(1, 8, 8))
    with pytest.raises(OptionError, match="no allocator to go to"):
        rankslim.compress(tiny_net, ratio=0.5, input_shape=(1, 8, 8), allocator_options={"iters": 3})
    with pytest.raises(BudgetError, match="needs a params and/or macs budget"):
        rankslim.compress(tiny_net, allocator="pos-greedy", input_shape=(1, 8, 8))
    with pytest.raises(BudgetError, match="use ratio=F"):
        rankslim.compress(tiny_net, params=0.5, allocator="ratio", input_shape=(1, 8, 8))
    # a configured allocator validates overrides too
    with pytest.raises(OptionError):
        get_allocator("pos-cvx", {"time_limit": "soon"})


def test_bad_solver_and_ranks_are_refused(tiny_net):
    with pytest.raises(OptionError, match="unknown SVD solver 'foo'"):
        rankslim.compress(tiny_net, params=0.5, input_shape=(1, 8, 8), solver="foo")
    with pytest.raises(RankError, match="whole number"):
        rankslim.compress(tiny_net, ranks={"conv*": "eight"}, input_shape=(1, 8, 8))
    with pytest.raises(RankError, match="whole number"):
        rankslim.compress(tiny_net, ranks={"conv*": 2.5}, input_shape=(1, 8, 8))
    with pytest.raises(RankError, match="must be an int"):
        rankslim.compress(tiny_net, ranks="8", input_shape=(1, 8, 8))


def test_cli_option_typo_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner
    from rankslim.cli import app
    r = CliRunner().invoke(app, ["compress", "zoo:lenet5", "--params", "0.5", "-M", "foo=1", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "has no option 'foo'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["compress", "zoo:lenet5", "--params", "0.5", "-A", "maxiter=3", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "allocator 'cptv' has no option 'maxiter'" in r.output


def test_methods_command_lists_options():
    from typer.testing import CliRunner
    from rankslim.cli import app
    r = CliRunner().invoke(app, ["methods"])
    assert r.exit_code == 0
    for needle in ("damping", "hooi_iters", "iht_iters", "maxiter", "trials", "time_limit"):
        assert needle in r.output
