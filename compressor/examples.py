"""Example inputs for tracing a model when the caller gives none."""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import InputError

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
