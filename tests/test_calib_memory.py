"""Calibration memory knobs: ``compress(calib_batch_size=, calib_memory_mib=)`` (``--calib-batch``,
``--calib-memory``) change how calibration runs, never what it computes; batches are gathered without a joined
copy of every sample, and never alias the user's data."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import rankslim
from rankslim.cli import app
from rankslim.data import calibration_batches, load_dataset
from rankslim.errors import OptionError
from tests.conftest import TinyNet, train_on_digits

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def trained() -> TinyNet:
    torch.manual_seed(0)
    return train_on_digits(TinyNet(), epochs=2)


def _run(net, **kw):
    return rankslim.compress(net, "zhang", params=0.5, input_shape=SHAPE, data="digits", calib_samples=100,
                             speed_aware=False, **kw)


@pytest.mark.parametrize("kw", [{"calib_batch_size": 7}, {"calib_memory_mib": 0}, {"calib_batch_size": 13,
                                                                                      "calib_memory_mib": 0.01}])
def test_batch_size_and_memory_bound_do_not_change_the_result(trained, kw):
    ref = _run(trained)
    got = _run(trained, **kw)
    assert dict(got.allocation) == dict(ref.allocation)
    x = load_dataset("digits", "test").tensors[0][:64]
    with torch.no_grad():
        a, b = ref.model(x), got.model(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("kw,needle", [({"calib_batch_size": 0}, "calib_batch_size"),
                                       ({"calib_batch_size": 2.5}, "calib_batch_size"),
                                       ({"calib_memory_mib": -1}, "calib_memory_mib"),
                                       ({"calib_memory_mib": float("nan")}, "calib_memory_mib")])
def test_bad_values_are_refused(tiny_net, kw, needle):
    with pytest.raises(OptionError, match=needle):
        _run(tiny_net, **kw)


def test_cli_flags(tmp_path):
    r = CliRunner().invoke(app, ["compress", "tests.conftest:TinyNet", "--input-shape", "1,8,8", "--method", "zhang",
                                 "--params", "0.5", "--data", "digits", "--calib-samples", "40", "--calib-batch",
                                 "9", "--calib-memory", "1", "--mac-only", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["compress", "tests.conftest:TinyNet", "--input-shape", "1,8,8", "--params", "0.5",
                                 "--calib-batch", "0", "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "calib_batch_size must be a positive integer" in r.output


def test_batches_are_gathered_per_batch_and_never_alias_the_data():
    data = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    for ds in (TensorDataset(data), [(row, 0) for row in data]):
        batches = calibration_batches(ds, 23, batch_size=10, seed=1)
        assert [len(b) for b in batches] == [10, 10, 3]
        got = torch.cat(batches)
        assert len({tuple(r.tolist()) for r in got}) == 23  # distinct samples of the data
        before = data.clone()
        for b in batches:
            b.zero_()
        assert torch.equal(data, before)
