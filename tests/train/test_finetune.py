"""Fine-tuning: distillation loss by hand, masked weights never revive, phased schedule freezes FC."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankslim
from rankslim.errors import RankslimError
from rankslim.train import distillation_loss, finetune
from tests.conftest import TinyNet, train_on_digits


def test_distillation_loss_hand_computed_two_samples():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    T, a = 2.0, 0.7

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kl = 0.0
    for i in range(2):
        ps, pt = softmax([v / T for v in s[i].tolist()]), softmax([v / T for v in t[i].tolist()])
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    kl /= 2
    ce = -(math.log(softmax(s[0].tolist())[0]) + math.log(softmax(s[1].tolist())[2])) / 2
    expected = a * T * T * kl + (1 - a) * ce
    assert float(distillation_loss(s, t, y, T, a)) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    return train_on_digits(TinyNet(), 3)


def test_finetune_never_revives_masked_weights(trained):
    pruned = rankslim.compress(trained, "prune", params=0.4, input_shape=(1, 8, 8)).model
    masked = {n: (m.weight.detach().clone(), m.mask.clone()) for n, m in pruned.named_modules() if hasattr(m, "mask")}
    assert len(masked) >= 3
    res = finetune(pruned, "digits", teacher=trained, epochs=2, lr=0.05, weight_decay=1e-3, seed=0)
    for n, (w0, mask) in masked.items():
        w1 = res.model.get_submodule(n).weight.detach()
        assert int((w1[~mask] != 0).sum()) == 0, n          # stored weights stay exactly zero off the mask
        assert int((w1 != 0).sum()) <= int(mask.sum()), n
        assert not torch.equal(w1[mask], w0[mask]), n      # the kept weights did train
    assert res.masked_layers == len(masked)
    # the user's compressed model is untouched
    assert all(torch.equal(pruned.get_submodule(n).weight.detach(), w0) for n, (w0, _) in masked.items())


def test_finetune_freeze_zeros_on_dense_model(trained):
    net = TinyNet()
    net.load_state_dict(trained.state_dict())
    with torch.no_grad():
        net.fc1.weight[:, ::2] = 0.0
    res = finetune(net, "digits", epochs=1, lr=0.05, freeze_zeros=True, bn_recalibrate=False, optimizer="adam")
    assert int((res.model.fc1.weight.detach()[:, ::2] != 0).sum()) == 0
    assert res.masked_layers >= 1


def test_phased_first_phase_trains_conv_with_fc_frozen(trained):
    res = finetune(trained, "digits", epochs=1, lr=0.05, phased=True, phase_epochs=(1, 0, 0), bn_recalibrate=False)
    assert torch.equal(res.model.fc1.weight, trained.fc1.weight) and torch.equal(res.model.fc2.bias, trained.fc2.bias)
    assert not torch.equal(res.model.conv2.weight, trained.conv2.weight)


def test_finetune_refuses_bad_settings(trained):
    with pytest.raises(RankslimError):
        finetune(trained, "digits", alpha=1.5)
    with pytest.raises(RankslimError):
        finetune(trained, "digits", epochs=2, phased=True)
    with pytest.raises(RankslimError):
        finetune(trained, "nope")
