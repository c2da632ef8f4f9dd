"""Reduction factors of a compressed model against its dense original: FLOPs, volume, params.

Every report states all three, whatever metric the budget counted, because users deploy
for whichever of them their runtime pays for. Each factor is dense / compressed, measured
by `stats.measure` on both models with the same example input:

- flops: MACs per sample (a slimmed network has fewer; zeroed weights do not change it),
- volume: activation volume, the summed output sizes of the Conv/Linear layers,
- params: nonzero parameters, what a sparse or slimmed file stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.stats import ModelStats, measure

if TYPE_CHECKING:
    from compressor.data import Data

FACTORS = ("flops", "volume", "params")


def example_for(model: nn.Module, data: Data | None) -> tuple[torch.Tensor, ...] | None:
    """A batch-2 input for measuring `model`: from the data, else zeros of its recorded shape.

    None when neither is known (a model built in Python and pruned without data).
    """
    if data is not None:
        return (data.sample_inputs(2),)
    shape = getattr(model, "input_shape", None)  # set by compressor.io on loaded models
    return (torch.zeros(2, *shape),) if shape else None


def factors_of(dense: ModelStats, pruned: ModelStats) -> dict[str, float | None]:
    """dense / pruned for FLOPs, volume and nonzero params (None where pruned has none)."""
    pairs = {
        "flops": (dense.flops, pruned.flops),
        "volume": (dense.volume, pruned.volume),
        "params": (dense.nonzero, pruned.nonzero),
    }
    return {key: (d / p if p else None) for key, (d, p) in pairs.items()}


class DenseBaseline:
    """The dense model's stats, taken before a method changes the model (it may work in place)."""

    def __init__(self, model: nn.Module, data: Data | None):
        self.example = example_for(model, data)
        self.stats = measure(model, self.example) if self.example is not None else None

    def factors(self, pruned: nn.Module) -> dict[str, float | None] | None:
        """The reduction factors of `pruned` against the baseline (None: no input known)."""
        if self.stats is None:
            return None
        return factors_of(self.stats, measure(pruned, self.example))
