"""Calibration statistics: streamed sums equal stored activations; sequential mode sees compressed inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import rankslim.calibrate as cal
from rankslim.calibrate import Calibrator, im2col
from rankslim.cost import trace_shapes
from rankslim.errors import DataError
from rankslim.surgery import replace_modules, select_targets

from .decompose._convs import conv_layers


def _targets(model, shape):
    return {t.name: t for t in select_targets(model, trace_shapes(model, shape))[0]}


def _stored_columns(model, name, batches):
    """Reference: the layer's stored inputs, turned into (k, n) columns and pre-bias outputs (m, n)."""
    mod = model.get_submodule(name)
    xs = []
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    x = torch.cat(xs)
    with torch.no_grad():
        if isinstance(mod, nn.Conv2d):
            X = im2col(mod, x).double().transpose(0, 1).reshape(mod.weight[0].numel(), -1)
            out = mod(x) - (mod.bias.view(1, -1, 1, 1) if mod.bias is not None else 0)
            Y = out.double().transpose(0, 1).reshape(out.shape[1], -1)
        else:
            X = x.reshape(-1, x.shape[-1]).double().T
            Y = (mod(x) - (mod.bias if mod.bias is not None else 0)).reshape(-1, mod.out_features).double().T
    return X, Y


@settings(max_examples=15, deadline=None)
@given(conv=conv_layers(max_c=4))
def test_im2col_matches_conv(conv):
    """The im2col columns times the weight matrix reproduce the conv for every padding/stride/dilation."""
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 9, 8)
    cols = im2col(conv, x)
    out = conv(x) - (conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0)
    ref = out.flatten(2)
    got = conv.weight.reshape(conv.out_channels, -1) @ cols
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
    nn.Conv2d(3, 6, 1),
])
def test_streamed_conv_stats_equal_stored(conv):
    torch.manual_seed(1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    batches = [torch.randn(4, 3, 9, 9), torch.randn(3, 3, 9, 9)]
    t = _targets(model, (3, 9, 9))["0"]
    st = Calibrator(model, batches, sequential=False, full_yy=True).stats_for(t, model)
    X, Y = _stored_columns(model, "0", batches)
    assert st.n == X.shape[1]
    assert torch.allclose(st.XX, X @ X.T, rtol=1e-9, atol=1e-9)
    assert torch.allclose(st.YX, Y @ X.T, rtol=1e-5, atol=1e-4)
    assert torch.allclose(st.YY, Y @ Y.T, rtol=1e-5, atol=1e-4)
    assert torch.allclose(st.x_sum, X.sum(1), atol=1e-9)
    assert torch.allclose(st.y_sum, Y.sum(1), rtol=1e-5, atol=1e-4)
    assert st.yy == pytest.approx(float((Y * Y).sum()), rel=1e-5)
    assert st.memory_bytes == 8 * (st.XX.numel() + st.YX.numel() + st.YY.numel() + st.x_sum.numel() + st.y_sum.numel())


def test_linear_tokens_and_chunking(monkeypatch):
    """Linear on (N, T, in): every token is a column; tiny chunks give the same sums."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [torch.randn(4, 7, 6), torch.randn(2, 7, 6)]
    t = _targets(model, (7, 6))["2"]
    ref = Calibrator(model, batches, sequential=False).stats_for(t, model)
    X, Y = _stored_columns(model, "2", batches)
    assert ref.n == 6 * 7
    assert torch.allclose(ref.XX, X @ X.T, atol=1e-9) and torch.allclose(ref.YX, Y @ X.T, atol=1e-5)
    monkeypatch.setattr(cal, "CHUNK_BYTES", 1)  # one sample per chunk
    small = Calibrator(model, batches, sequential=True).stats_for(t, model)
    assert torch.allclose(small.XX, ref.XX, atol=1e-9) and torch.allclose(small.YX, ref.YX, atol=1e-9)


def _two_convs():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2)).eval()


def test_sequential_mode_feeds_compressed_inputs():
    model = _two_convs()
    batches = [torch.randn(5, 2, 8, 8)]
    calib_seq = Calibrator(model, batches, sequential=True)
    calib_ind = Calibrator(model, batches, sequential=False)
    work = copy.deepcopy(model)
    targets = _targets(work, (2, 8, 8))
    # "compress" the first conv: a visibly different layer
    new = copy.deepcopy(work[0])
    with torch.no_grad():
        new.weight.mul_(0.5)
    replace_modules(work, {"0": new})
    seq = calib_seq.stats_for(targets["2"], work)
    ind = calib_ind.stats_for(targets["2"], work)
    Xc, _ = _stored_columns(work, "2", batches)          # inputs after the compressed layer
    Xo, Yo = _stored_columns(model, "2", batches)        # original inputs and original outputs
    assert torch.allclose(seq.XX, Xc @ Xc.T, atol=1e-8)
    assert torch.allclose(seq.YX, Yo @ Xc.T, atol=1e-4)   # Y from the original model, X compressed
    assert torch.allclose(ind.XX, Xo @ Xo.T, atol=1e-8)
    assert not torch.allclose(seq.XX, ind.XX, atol=1e-3)
    assert seq.sequential and not ind.sequential


def test_original_is_protected_without_cache():
    """Past the cache limit a private copy of the original model answers, even if the model is edited in place."""
    model = _two_convs()
    batches = [torch.randn(3, 2, 8, 8)]
    t = _targets(model, (2, 8, 8))["2"]
    cached = Calibrator(model, batches, sequential=False).stats_for(t, model)
    c = Calibrator(model, batches, sequential=False, cache_limit_bytes=0)
    assert c.cache is None
    with torch.no_grad():
        model[0].weight.zero_()                                # in-place change after construction
    st = c.stats_for(t, model)
    assert torch.allclose(st.XX, cached.XX) and torch.allclose(st.YX, cached.YX)


def test_position_cap_and_raw_columns():
    model = _two_convs()
    batches = [torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)]
    t = _targets(model, (2, 8, 8))["0"]
    st = Calibrator(model, batches, sequential=False, max_positions=10, raw_columns=25).stats_for(t, model, raw=True)
    assert st.n == 8 * 10 and st.positions_per_sample == 10
    W = t.matrix.double()
    assert torch.allclose(st.YX, W @ st.XX, atol=1e-8)   # independent: Y = W X exactly
    assert st.X.shape == (18, 25) and st.Y.shape == (6, 25)
    assert torch.allclose(st.Y, W @ st.X, atol=1e-8)
    assert st.memory_bytes >= 8 * (st.X.numel() + st.Y.numel())
    full = Calibrator(model, batches, sequential=False).stats_for(t, model, raw=True)
    assert full.X.shape[1] == min(4096, full.n)
    again = Calibrator(model, batches, sequential=False, max_positions=10, raw_columns=25).stats_for(t, model, raw=True)
    assert torch.equal(again.X, st.X)                     # seeded


def test_bad_input():
    model = _two_convs()
    with pytest.raises(DataError):
        Calibrator(model, [])
    with pytest.raises(DataError):
        Calibrator(model, [torch.randn(2, 2, 8, 8)], max_positions=0)
    c = Calibrator(model, [torch.randn(2, 2, 8, 8)], sequential=True)
    t = _targets(model, (2, 8, 8))["0"]
    with pytest.raises(DataError):
        c.stats_for(t, None)


def test_compress_calibrates_later_layers_on_compressed_inputs(monkeypatch):
    """Through compress(): with sequential=True the 2nd target's x-statistics are those of the COMPRESSED model's
    inputs to it; with sequential=False they are the original model's.  Measured with forward hooks on the
    original and on the returned model, independently of the Calibrator."""
    from torch.utils.data import TensorDataset

    import rankslim
    from rankslim.data import load_dataset
    from rankslim.zoo import get_zoo_model

    images = load_dataset("fashion-mnist", "test").tensors[0][:40]
    calls: list[tuple[str, torch.Tensor]] = []
    real = Calibrator.stats_for

    def recording(self, target, *args, **kwargs):
        st = real(self, target, *args, **kwargs)
        calls.append((target.name, st.XX.clone()))
        return st

    monkeypatch.setattr(Calibrator, "stats_for", recording)  # records, changes nothing
    results, seen = {}, {}
    for seq in (True, False):
        calls.clear()
        # fc1 -> fc2 at rank 4: fc1's output, the input of fc2, changes visibly
        results[seq] = rankslim.compress("zoo:lenet5", "zhang", include=["fc*"], ranks=4, sequential=seq,
                                         data=TensorDataset(images), calib_samples=len(images))
        seen[seq] = list(calls)

    def gram_of_inputs(model, name):
        xs = []
        h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
        with torch.no_grad():
            model(images)
        h.remove()
        X = torch.cat(xs).double()
        return X.T @ X

    def close(a, b):
        return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max())))

    original = get_zoo_model("lenet5")
    orig_fc1, orig_fc2 = gram_of_inputs(original, "fc1"), gram_of_inputs(original, "fc2")
    comp_fc2 = gram_of_inputs(results[True].model, "fc2")  # fc2 sees the rank-4 fc1 here
    assert not close(comp_fc2, orig_fc2)  # the compression of fc1 is visible in fc2's inputs
    for seq in (True, False):
        assert {"fc1", "fc2"} <= {n for n, _ in seen[seq]}
        # the first target has nothing compressed before it: every mode sees the original inputs
        assert all(close(xx, orig_fc1) for n, xx in seen[seq] if n == "fc1")
    # the statistics fc2 is decomposed with (the last ones computed for it) come from the compressed fc1 ...
    assert close([xx for n, xx in seen[True] if n == "fc2"][-1], comp_fc2)
    # ... and without sequential calibration every statistic of fc2 is the original model's
    assert all(close(xx, orig_fc2) for n, xx in seen[False] if n == "fc2")
