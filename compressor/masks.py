"""Weight masks as parametrizations, and the list of prunable layers.

A method decides masks; this module installs them (`W` becomes `W * mask` on every
forward, so training sees the masked weight) and strips them again, baking the zeros
into the plain weight so nothing of the machinery survives `finalize()`.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


class WeightMask(nn.Module):
    """Parametrization multiplying a weight by a fixed 0/1 mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv1d/Conv2d/Linear layers by module path, minus those matching an `exclude` glob."""
    return {
        fqn: module
        for fqn, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
        and not any(fnmatch.fnmatchcase(fqn, pattern) for pattern in exclude)
    }


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's underlying (unmasked) weight, parametrized or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def apply_masks_(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Installs (or replaces) a WeightMask on each layer named in `masks`. In place."""
    for fqn, mask in masks.items():
        module = layers[fqn]
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


def strip_(model: nn.Module) -> nn.Module:
    """Bakes every parametrization into its plain tensor and removes it. In place."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def bake_masks_(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zeros the masked-out weights directly, without a parametrization. In place."""
    with torch.no_grad():
        for fqn, mask in masks.items():
            weight_of(layers[fqn]).mul_(mask.to(weight_of(layers[fqn]).dtype))


def has_machinery(model: nn.Module) -> list[str]:
    """Names any parametrization left on `model` (empty when clean)."""
    return [fqn for fqn, m in model.named_modules() if parametrize.is_parametrized(m)]


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A mask keeping exactly `keep` entries with the largest scores (ties: lowest index)."""
    flat = scores.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        # stable sort makes equal scores resolve by position, so results are reproducible
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask.view_as(scores)
