"""Example inputs for tracing a model when the caller gives none."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.errors import InputError

if TYPE_CHECKING:
    from compressor.data import Data

EXAMPLE_SEED = 0  # a fixed generator: tracing must not depend on (or move) the global RNG


def example_inputs_of(model: nn.Module, example_inputs, who: str) -> tuple:
    """The example inputs given, as a tuple; else a seeded random batch of `model.input_shape`.

    Raises:
        InputError: none given and the model has no `input_shape`; `who` names the caller.
    """
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    shape = getattr(model, "input_shape", None)
    if not shape:
        raise InputError(
            f"{who} traces the model and needs example inputs: pass "
            "prepare(example_inputs=...) or give the model an input_shape"
        )
    generator = torch.Generator().manual_seed(EXAMPLE_SEED)
    return (torch.randn(2, *shape, generator=generator),)


def calibration_inputs(data: Data | None, samples: int, batch_size: int) -> torch.Tensor:
    """The first `samples` calibration images of `data` (labels, if any, are ignored)."""
    if data is None:
        raise InputError("reconstruction needs calibration inputs; pass --data SPEC")
    loader = data.calibration(samples, batch_size)
    return torch.cat([x for x, _ in loader])
