"""Refuses data with NaN or Inf values before a model trains on it.

A NaN input poisons every gradient it touches, and training on it "succeeds" with a
model of NaN weights; the user learns of it, if at all, hours later.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor.errors import InputError

__all__ = ["check_finite", "check_loader_finite"]


def check_finite(name: str, values: torch.Tensor, source: str) -> None:
    """Raises if a float tensor holds NaN or +-Inf values.

    Args:
        name: what the tensor is, as the user knows it (e.g. "x", "x_val").
        values: the tensor; integer tensors pass unchecked (they cannot hold either).
        source: where it came from, for the message (the data spec).

    Raises:
        InputError: names the array, the counts of NaN and Inf values and the total.
    """
    if not (values.is_floating_point() or values.is_complex()):
        return
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    if nan or inf:
        raise InputError(
            f"{name} in {source!r} has {nan} NaN and {inf} Inf values (of {values.numel()}); "
            "clean the data (e.g. numpy.nan_to_num, or drop those samples) and retry"
        )


def check_loader_finite(loader: DataLoader | None, split: str, source: str) -> None:
    """Checks a loader's inputs: all of them for a TensorDataset, else its first batch.

    A loader over any other dataset may stream from disk or augment on the fly, so a full
    pass would cost an epoch; its first batch is what can be checked cheaply.

    Raises:
        InputError: see `check_finite`; the name says which split (and batch) was checked.
    """
    if loader is None:
        return
    dataset = loader.dataset
    if isinstance(dataset, TensorDataset):
        for tensor, part in zip(dataset.tensors, ("inputs", "labels")):
            check_finite(f"the {split} {part}", tensor, source)
        return
    # a loader of its own, unshuffled, so the user's sampler and generator are not advanced
    in_order = DataLoader(dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    batch = next(iter(in_order), None)
    if isinstance(batch, (tuple, list)) and batch:
        check_finite(f"the first {split} batch's inputs", torch.as_tensor(batch[0]), source)
