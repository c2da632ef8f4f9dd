"""How much a model's inputs move its outputs: the scale of export verification.

A tolerance relative to the output's magnitude lets a model that ignores its input pass
trivially (a constant output matches itself, max difference 0). The scale that matters is
the inputs' effect: the spread of each output element across the sample inputs. A model
whose spread is nil next to its magnitude has a constant output: it was destroyed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError
from exporters._common import flat_outputs

# An output whose spread across distinct inputs is below this fraction of its magnitude
# is constant: float32 carries ~7 digits, so anything the inputs change shows far above it.
CONSTANT_RTOL = 1e-6
# The tolerance never drops below this share of the output magnitude (times the relative
# tolerance: 2e-5 of it), because float32 sums in another order differ by that much
# whatever the inputs' effect: measured 1.8e-5 of the magnitude on a random-init
# MobileNetV3-style graph after reconstruction, where large activations cancel into a
# small, nearly input-independent output. A healthy classifier's logits spread across
# inputs by more than this share of their magnitude, so for them the effect decides.
ROUNDING_SHARE = 0.2


class ConstantOutputError(CompressorError):
    """The model's output does not depend on its input."""


def input_effect(model: nn.Module, batches: list[tuple]) -> float | None:
    """The largest standard deviation, across all samples of `batches`, of any output element.

    None when the batches hold fewer than two distinct samples (nothing to compare).
    """
    inputs = [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]
    flat = torch.cat([x.reshape(len(x), -1).double() for x in inputs], dim=1)
    if len(torch.unique(flat, dim=0)) < 2:
        return None
    per_batch = [flat_outputs(model, batch) for batch in batches]
    effect = 0.0
    for k in range(len(per_batch[0])):
        parts = [outs[k] for outs, b in zip(per_batch, batches) if _batched(outs[k], b)]
        if len(parts) == len(batches):  # outputs without a batch axis carry no spread
            stacked = torch.cat(parts).double()
            effect = max(effect, float(stacked.std(dim=0, correction=0).max()))
    return effect


def _batched(output: torch.Tensor, batch: tuple) -> bool:
    return output.dim() > 0 and len(output) == len(batch[0])


def tolerance(rtol: float, effect: float | None, scale: float) -> float:
    """`rtol` x the inputs' effect, at least `rtol` x ROUNDING_SHARE x the output scale."""
    reference = max(effect if effect is not None else scale, ROUNDING_SHARE * scale)
    return rtol * reference


def is_constant(effect: float | None, scale: float) -> bool:
    """Whether distinct inputs gave (nearly) the same output (never when not measurable)."""
    return effect is not None and effect <= CONSTANT_RTOL * scale + np.finfo(np.float64).tiny


def check_effect(effect: float | None, scale: float, allow_constant: bool) -> None:
    """Raises ConstantOutputError for a constant output unless `allow_constant`."""
    if is_constant(effect, scale) and not allow_constant:
        raise ConstantOutputError(
            f"output is constant across inputs: the model ignores its input (largest spread "
            f"{effect:.3g} at output scale {scale:.3g}); a compression destroyed it, or pass "
            "--allow-constant-output to export it anyway"
        )
