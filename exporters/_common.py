"""Helpers both exporters use: eval mode for the duration, flattened model outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts `model` in eval mode for the block and restores the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def flat_outputs(model: nn.Module, batch: tuple) -> list[torch.Tensor]:
    """The model's outputs on `batch` (no grad) as a flat list of tensors."""
    with torch.no_grad():
        out = model(*batch)
    leaves = torch.utils._pytree.tree_leaves(out)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
