"""Data from the user: `PATH.npz` / `PATH.pt` files and `package.module:function` specs.

`compressor.data.load_data` dispatches here; the splitting and wrapping are data.py's.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor import filebounds
from compressor.data import Data, _Options, _split_val, _unlabelled, _wrap
from compressor.datacheck import check_finite, check_loader_finite
from compressor.errors import CompressorWarning, InputError
from compressor.user_code import call_spec

# --- user files ---------------------------------------------------------------------


def load_file(spec: str, opts: _Options) -> Data:
    """Reads x (and y, x_val, y_val, x_test, y_test) from an .npz or .pt file."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"data file {spec!r} does not exist; check the path")
    arrays = _read_npz(path) if path.suffix.lower() == ".npz" else _read_pt(path)
    if "x" not in arrays:
        raise InputError(
            f"data file {spec!r} has no 'x' array (keys found: {sorted(arrays)}); save the "
            "inputs under 'x' (and optional 'y', 'x_val', 'y_val', 'x_test', 'y_test')"
        )
    tensors = {key: torch.as_tensor(value) for key, value in arrays.items()}
    has_labels = "y" in tensors
    train, val, test = (
        _file_split(tensors, part, has_labels, spec) for part in ("", "_val", "_test")
    )
    if val is None:
        train, val = _split_val(*train, opts)
    else:  # keep the file's validation set, but still shuffle train so `limit` is a random subset
        train = _split_val(*train, replace(opts, val_fraction=0.0))[0]
    num_classes = None
    if has_labels:
        labels = [part[1] for part in (train, val, test) if part is not None and len(part[1])]
        num_classes = int(max(int(y.max()) for y in labels)) + 1
    return _wrap(spec, opts, train, val, test, num_classes=num_classes)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    filebounds.check_npz(path)  # numpy allocates each member's declared shape up front
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, AttributeError, zipfile.BadZipFile, MemoryError) as exc:
        # A .npy renamed to .npz loads as a bare array (no .files), hence AttributeError.
        raise InputError(
            f"cannot read {path} as an .npz archive ({exc}); write it with "
            "numpy.savez(path, x=..., y=...)"
        ) from exc


def _read_pt(path: Path) -> dict[str, object]:
    filebounds.check_torch_file(path, "data file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        raise InputError(
            f"cannot load {path} with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {exc}); write it with torch.save({{'x': ..., 'y': ...}}, path)"
        ) from exc
    if not isinstance(obj, dict):
        raise InputError(
            f"data file {path} holds a {type(obj).__name__}; save a dict with 'x' (and 'y')"
        )
    return obj


def _file_split(
    tensors: dict[str, torch.Tensor], suffix: str, has_labels: bool, spec: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Returns ``(x, y)`` for one split of a user file, -1 labels when unlabelled."""
    x_key, y_key = f"x{suffix}", f"y{suffix}"
    if x_key not in tensors:
        return None
    x = tensors[x_key]
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{x_key!r} in {spec!r} has shape {tuple(x.shape)}; expected (N, ...)")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    check_finite(x_key, x, spec)
    if not has_labels:
        return x, _unlabelled(len(x))
    if y_key not in tensors:
        raise InputError(f"{spec!r} has {x_key!r} but no {y_key!r}; add the labels or drop 'y'")
    return x, _check_labels(tensors[y_key], len(x), y_key, spec)


def _check_labels(y: torch.Tensor, count: int, key: str, spec: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != count or y.is_floating_point() or y.is_complex():
        raise InputError(
            f"{key!r} in {spec!r} must be a 1-D integer array of {count} class indices, "
            f"got {y.dtype} of shape {tuple(y.shape)}"
        )
    if len(y) and y.min() < 0:
        raise InputError(f"{key!r} in {spec!r} has negative labels; use class indices 0..C-1")
    return y.long()


# --- module:function ----------------------------------------------------------------


def load_module(spec: str, opts: _Options) -> Data:
    """Calls the user's function; takes the Data or the loaders it returns."""
    if opts.limit is not None:
        warnings.warn(
            f"limit={opts.limit} is ignored for {spec!r}: its loaders arrive already built",
            CompressorWarning,
            stacklevel=3,
        )
    result = call_spec(spec, "--data")
    if not isinstance(result, Data):
        result = _data_from_loaders(spec, _loaders_of(result, spec), opts.seed)
    for split in ("train", "val", "test"):
        check_loader_finite(getattr(result, split), split, spec)
    return result


def _loaders_of(result: object, spec: str) -> tuple[DataLoader | None, ...]:
    """Normalises a function's return value to (train, val, test)."""
    if isinstance(result, DataLoader):
        loaders = (result, None, None)
    elif isinstance(result, dict) and "train" in result:
        loaders = (result["train"], result.get("val"), result.get("test"))
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        loaders = (*result, None) if len(result) == 2 else tuple(result)
    else:
        raise InputError(
            f"{spec!r} returned a {type(result).__name__}; return a Data, a dict with "
            "'train' (and 'val', 'test') DataLoaders, or a (train, val) tuple"
        )
    for loader in loaders:
        if loader is not None and not isinstance(loader, DataLoader):
            raise InputError(f"{spec!r} returned a {type(loader).__name__} instead of a DataLoader")
    return loaders


def _data_from_loaders(spec: str, loaders: tuple[DataLoader | None, ...], seed: int) -> Data:
    train = loaders[0]
    batch = next(iter(train), None)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(
            f"{spec!r}: train batches must be (x, y) pairs (use y = -1 for unlabelled data), "
            f"got {type(batch).__name__}"
        )
    x, y = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    has_labels = bool((y >= 0).all())
    num_classes = _count_classes(train) if has_labels else None
    return Data(*loaders, tuple(x.shape[1:]), num_classes, spec, has_labels, seed=seed)


def _count_classes(loader: DataLoader) -> int:
    """Number of classes: from the labels tensor, ``dataset.classes``, or one full pass."""
    dataset = loader.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return int(dataset.tensors[1].max().item()) + 1
    if isinstance(getattr(dataset, "classes", None), (list, tuple)):
        return len(dataset.classes)
    return int(max(torch.as_tensor(y).max().item() for _, y in loader)) + 1
