"""Calibration inputs are checked before any compression work, and non-float32 models compress.

Every bad input gives one :class:`DataError` line that names what was received and what is expected.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import rankslim
from rankslim.data import calibration_batches, check_batches, to_model_dtype
from rankslim.errors import DataError

SHAPE = (1, 8, 8)


class LeNetLike(nn.Module):
    """Two convs and two Linear layers for 8x8 single-channel images (scikit-learn digits), with BN."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def lenet(dtype: torch.dtype = torch.float32, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return LeNetLike(in_channels).to(dtype).eval()


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


class DictItems(Dataset):
    """Hugging Face style items: ``{"pixel_values": x, "label": y}``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": torch.zeros(SHAPE), "label": i % 2}


class RaggedItems(Dataset):
    """Images of two different sizes."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(1, 8 + i % 2, 8)


def test_wrong_channels_names_both_shapes():
    with pytest.raises(DataError) as exc:
        check_batches(lenet(in_channels=3), calibration_batches("digits", 16), (3, 8, 8))
    assert "(1, 8, 8)" in one_line(exc) and "(3, 8, 8)" in one_line(exc)


def test_compress_refuses_wrong_shaped_data_before_compressing(monkeypatch):
    import rankslim.calibrate as cal

    def no_calibration(*a, **k):
        raise AssertionError("calibration started on data that fails the checks")
    monkeypatch.setattr(cal.Calibrator, "__init__", no_calibration)
    with pytest.raises(DataError, match=r"\(1, 8, 8\).*\(3, 8, 8\)"):
        rankslim.compress(lenet(in_channels=3), "zhang", params=0.5, input_shape=(3, 8, 8), data="digits",
                          calib_samples=32)


def test_dict_items_and_batches_are_keyword_inputs():
    # issue 9: dict items are the model's keyword inputs; 'label' keys are dropped
    for data in (DictItems(), DataLoader(DictItems(), batch_size=4)):
        batches = calibration_batches(data, 8)
        assert all(set(b) == {"pixel_values"} for b in batches)
        assert sum(b["pixel_values"].shape[0] for b in batches) == 8


def test_tuple_batches_the_model_cannot_take_are_explained():
    # a tuple batch is positional inputs (issue 9): a model taking one tensor fails on two, in one line
    x = torch.zeros(4, *SHAPE)
    with pytest.raises(DataError) as exc:
        check_batches(lenet(), [(x, torch.zeros(4))], SHAPE)  # type: ignore[list-item]
    msg = one_line(exc)
    assert "the model failed on calibration inputs" in msg and "TypeError" in msg


def test_ragged_items_and_empty_data():
    with pytest.raises(DataError, match="different per-sample shapes"):
        calibration_batches(RaggedItems(), 6)
    with pytest.raises(DataError, match="empty"):
        check_batches(lenet(), [], SHAPE)
    with pytest.raises(DataError, match="no samples"):
        check_batches(lenet(), [torch.zeros(0, *SHAPE)], SHAPE)


def test_nan_and_inf_are_counted():
    x = torch.randn(40, *SHAPE)
    x[3, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    x[17, 0, 2, 2] = float("-inf")
    ds = TensorDataset(x, torch.zeros(40, dtype=torch.long))
    with pytest.raises(DataError) as exc:
        rankslim.compress(lenet(), "zhang", params=0.5, input_shape=SHAPE, data=ds, calib_samples=40)
    assert "3 NaN/Inf value(s) in 2 of 40 samples" in one_line(exc)


def test_integer_images_get_a_conversion_hint():
    x = torch.randint(0, 256, (16, *SHAPE), dtype=torch.uint8)
    with pytest.raises(DataError) as exc:
        check_batches(lenet(), [x], SHAPE)
    msg = one_line(exc)
    assert "uint8" in msg and "float32" in msg and ".float()" in msg


def test_integer_token_ids_are_fine_for_an_embedding_model():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16)).eval()
    ids = torch.randint(0, 50, (4, 7))
    batches = [ids]
    check_batches(model, batches, (7,))
    assert batches[0] is ids  # integer inputs are left as they are


class Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("expected normalised inputs\nsecond line of detail")


def test_model_error_is_one_line_and_mode_is_restored():
    model = Fails().train()
    with pytest.raises(DataError) as exc:
        check_batches(model, [torch.zeros(3, 8, 8)], (8, 8))
    msg = one_line(exc)
    assert "ValueError: expected normalised inputs" in msg and "second line" not in msg
    assert model.training
    ok = lenet().train()
    check_batches(ok, calibration_batches("digits", 8), SHAPE)
    assert ok.training and ok.bn1.num_batches_tracked.item() == 0  # ran in eval mode: BN stats untouched


def test_batches_are_cast_to_the_model_dtype():
    batches = calibration_batches("digits", 8)
    orig = batches[0]
    check_batches(lenet(torch.float64), batches, SHAPE)
    assert batches[0].dtype == torch.float64 and orig.dtype == torch.float32  # new tensors; the old ones unchanged
    assert torch.equal(batches[0], orig.double())
    assert [b.dtype for b in to_model_dtype([orig], lenet(torch.bfloat16))] == [torch.bfloat16]


@pytest.mark.parametrize("method", ["zhang", "svd"])
def test_float64_model_compresses_and_stays_float64(method):
    model = lenet(torch.float64)
    res = rankslim.compress(model, method, params=0.5, input_shape=SHAPE, data="digits", calib_samples=64,
                            bn_recalibrate=True)
    assert {p.dtype for p in res.model.parameters()} == {torch.float64}
    assert not isinstance(res.model.fc1, nn.Linear)
    assert sum(p.numel() for p in res.model.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
    x = calibration_batches("digits", 32, seed=1)[0].double()
    y = res.model(x)
    assert y.dtype == torch.float64 and bool(torch.isfinite(y).all())
    assert model.conv1.weight.dtype == torch.float64 and isinstance(model.fc1, nn.Linear)  # user's model untouched


def test_half_model_compresses_with_a_data_aware_method():
    model = lenet(torch.bfloat16)
    res = rankslim.compress(model, "zhang", params=0.5, input_shape=SHAPE, data="digits", calib_samples=32)
    y = res.model(calibration_batches("digits", 8)[0].to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
