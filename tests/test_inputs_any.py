"""Model inputs of any form (issue 9): token ids (LongTensor), tuples, dicts; calibration data that
yields them, a ``transform`` hook, the input taken from the data; BatchNorm re-estimation on them.

MACs are measured here with ``FlopCounterMode`` on the same example the model is called with;
parameters with ``numel`` on the built modules.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import rankslim
from rankslim.data import calibration_batches, check_batches
from rankslim.errors import DataError, RankslimError
from rankslim.inputs import call_model
from tests._measure import count_params

VOCAB, T = 50, 10


def flop_macs(model: nn.Module, *args, **kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(*args, **kwargs)
    return fc.get_total_flops() // 2


class TwoInputs(nn.Module):
    """forward(image, extra): an image branch and a vector branch joined before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.vec = nn.Linear(6, 32)
        self.fc1 = nn.Linear(16 * 8 * 8 + 32, 64)
        self.fc2 = nn.Linear(64, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.conv(image))).flatten(1)
        return self.fc2(torch.relu(self.fc1(torch.cat([a, torch.relu(self.vec(extra))], 1))))


class TokenModel(nn.Module):
    """forward(input_ids, attention_mask=None): embedding, two Linear layers, masked mean, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(input_ids))))
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.head((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))


class Pairs(Dataset):
    """Items ``((image, extra), label)``: the model's inputs are a tuple."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return (torch.randn(1, 8, 8, generator=g), torch.randn(6, generator=g)), i % 3


def test_long_token_ids_compress_and_macs_are_per_sequence():
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(0, VOCAB, (1, T))
    res = rankslim.compress(model, "svd", macs=0.6, example_inputs=ids)
    assert flop_macs(res.model, ids) <= 0.6 * flop_macs(model, ids)
    assert res.report.original.macs == flop_macs(model, ids)  # per sample = one sequence of T tokens
    note = next(n for n in res.report.notes if "tokens" in n)
    assert f"{T} tokens" in note and f"{flop_macs(model, ids) / T:,.0f} MACs per token" in note


def test_dict_data_with_attention_mask_data_aware_and_shape_from_data():
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(1, VOCAB, (32, T))
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "label": 0} for i in range(32)]
    loader = DataLoader(items, batch_size=8)
    # no input_shape, no example: the first calibration sample is the example
    res = rankslim.compress(model, "zhang", params=0.7, data=loader, calib_samples=16)
    assert count_params(res.model) <= 0.7 * count_params(model)
    out = res.model(input_ids=ids[:4], attention_mask=mask[:4])
    assert out.shape == (4, 4) and torch.isfinite(out).all()


def test_tuple_inputs_with_transform_and_bn_recalibration():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    image, extra = torch.randn(1, 1, 8, 8), torch.randn(1, 6)
    seen = []

    def transform(item):
        seen.append(1)
        (img, vec), _label = item
        return img, vec

    res = rankslim.compress(model, "zhang", params=0.5, example_inputs=(image, extra), data=Pairs(),
                            transform=transform, calib_samples=16, bn_recalibrate=True)
    assert seen and count_params(res.model) <= 0.5 * count_params(model)
    assert flop_macs(res.model, image, extra) < flop_macs(model, image, extra)
    # BN statistics were re-estimated on the tuple batches: they changed from the original's
    assert not torch.equal(res.model.bn.running_mean, model.bn.running_mean)
    assert torch.isfinite(res.model(image, extra)).all()


def test_calibration_batches_of_each_form():
    ids = torch.randint(0, VOCAB, (20, T))
    b = calibration_batches(TensorDataset(ids), 12, batch_size=5)
    assert [x.shape[0] for x in b] == [5, 5, 2] and b[0].dtype == torch.long
    b = calibration_batches(ids, 7)  # a plain tensor of inputs
    assert sum(x.shape[0] for x in b) == 7
    b = calibration_batches(Pairs(), 6, transform=lambda item: item[0])
    assert isinstance(b[0], tuple) and b[0][0].shape == (6, 1, 8, 8) and b[0][1].shape == (6, 6)
    out = call_model(TwoInputs().eval(), b[0])
    assert out.shape == (6, 3)


def test_bad_inputs_give_one_clear_error():
    model = TokenModel().eval()
    with pytest.raises(DataError, match="example_inputs must be"):
        rankslim.compress(model, "svd", ratio=0.5, example_inputs="hello")
    with pytest.raises(RankslimError, match="example_inputs"):
        rankslim.compress(model, "svd", ratio=0.5)
    with pytest.raises(DataError, match="transform returned"):
        calibration_batches(Pairs(), 4, transform=lambda item: "text")
    ragged = [{"input_ids": torch.zeros(n, dtype=torch.long)} for n in (5, 6)]
    with pytest.raises(DataError, match="pad token sequences"):
        calibration_batches(ragged, 2)
    with pytest.raises(DataError, match="the model failed on calibration inputs"):
        check_batches(model, [{"input_ids": torch.zeros(2, T, dtype=torch.long), "bogus": torch.zeros(2)}], None)


def make_token_model() -> nn.Module:
    """For the CLI (``tests.test_inputs_any:make_token_model``)."""
    torch.manual_seed(0)
    return TokenModel().eval()


def test_cli_ranks_methods_own_data_and_example_inputs(tmp_path):
    from typer.testing import CliRunner

    from rankslim.cli import app
    ids = torch.randint(1, VOCAB, (40, T), generator=torch.Generator().manual_seed(3))
    torch.save(ids[:1], tmp_path / "example.pt")
    import numpy as np
    np.save(tmp_path / "calib.npy", ids.numpy())
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", "tests.test_inputs_any:make_token_model", "--example-inputs",
                                 str(tmp_path / "example.pt"), "--data", str(tmp_path / "calib.npy"),
                                 "--ranks", "fc1=4", "--ranks", "fc2=6", "--methods", "fc2=zhang", "--out", str(out)])
    assert r.exit_code == 0, r.output
    back = rankslim.load(out / "model.rankslim", model=make_token_model())
    # the ranks asked for, measured on the rebuilt layers' factor shapes; fc2 was built by zhang
    assert back.fc1.first.weight.shape[0] == 4 and back.fc2.first.weight.shape[0] == 6
    assert rankslim.plan.get_plan(back).layers[1].method == "zhang"
    bad = CliRunner().invoke(app, ["compress", "tests.test_inputs_any:make_token_model", "--example-inputs",
                                   str(tmp_path / "example.pt"), "--ranks", "fc1", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "glob=rank" in bad.output
