"""Magnitude pruning baselines: uniform per layer, global, and ERK allocation.

Every later benchmark compares against these, so they are exact: each layer keeps
precisely its allotted count of largest-|w| weights (ties resolved by position).

With `--pattern` (compressor/pattern_masks.py) a block's score is the sum of its |w| (its
l1 norm) and an N:M group keeps its N largest |w|. N:M fixes each layer's sparsity, so
uniform and ERK cannot allot per-layer counts: all three choose the layers to pattern the
global way (least |w| removed per pruned weight first); RxC blocks keep each method's
per-layer counts (uniform, ERK) or its one global ranking, exact to one block per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.masks import floor_counts, global_topk, weight_of
from compressor.methods.base import MaskMethod, register_method
from compressor.pattern_masks import layer_masks, select_masks


def erk_densities(layers: dict[str, nn.Module], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-kernel densities whose parameter-weighted mean is `1 - sparsity`.

    Density is proportional to sum(shape) / prod(shape) (Evci et al. 2020, RigL); layers
    that would exceed density 1 are made dense and the rest rescaled, until none does.
    """
    shapes = {fqn: tuple(weight_of(m).shape) for fqn, m in layers.items()}
    sizes = {fqn: float(torch.Size(s).numel()) for fqn, s in shapes.items()}
    raw = {fqn: sum(s) / sizes[fqn] for fqn, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[f] for f in dense)
        divisor = sum(raw[f] * sizes[f] for f in layers if f not in dense)
        scale = budget / divisor if divisor else 0.0
        over = [f for f in layers if f not in dense and scale * raw[f] > 1.0]
        if not over:
            return {f: 1.0 if f in dense else scale * raw[f] for f in layers}
        dense.add(max(over, key=lambda f: raw[f]))


def exact_counts(
    densities: dict[str, float], sizes: dict[str, int], keep_total: int
) -> dict[str, int]:
    """Rounds per-layer keep counts so they sum to exactly `keep_total` (largest remainder)."""
    wanted = {f: min(sizes[f], densities[f] * sizes[f]) for f in densities}
    counts = {f: int(wanted[f]) for f in wanted}
    by_remainder = sorted(wanted, key=lambda f: wanted[f] - counts[f], reverse=True)
    shortfall = keep_total - sum(counts.values())
    for fqn in by_remainder:
        if shortfall <= 0:
            break
        if counts[fqn] < sizes[fqn]:
            counts[fqn] += 1
            shortfall -= 1
    return counts


def erk_counts(
    layers: dict[str, nn.Module], sparsity: float, keep: float, floors=None
) -> dict[str, int]:
    """Per-layer keep counts of the ERK allocation, summing exactly to the global target.

    Args:
        floors: a callable giving per-layer minimum counts for a total (Method.floors).
    """
    sizes = {f: weight_of(m).numel() for f, m in layers.items()}
    densities = erk_densities(layers, sparsity)
    counts = exact_counts(densities, sizes, round(keep * sum(sizes.values())))
    minimum = floors(sum(counts.values())) if floors is not None else None
    return counts if minimum is None else floor_counts(counts, minimum)


def masks_from_counts(
    layers: dict[str, nn.Module], counts: dict[str, int], floors: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Per layer, keep the `counts[fqn]` weights of largest magnitude (and its floor)."""
    return {
        f: global_topk({f: weight_of(m).detach().abs()}, counts[f], floors)[f]
        for f, m in layers.items()
    }


class _Magnitude(MaskMethod):
    def _sizes(self) -> dict[str, int]:
        return {f: weight_of(m).numel() for f, m in self.layers.items()}

    def _keep_total(self) -> int:
        return round(self.budget.keep * sum(self._sizes().values()))

    def _masks(self, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        floors = self.floors(sum(counts.values()))
        counts = counts if floors is None else floor_counts(counts, floors)
        if self.pattern is not None:
            scores = {f: weight_of(m).detach().abs() for f, m in self.layers.items()}
            return layer_masks(self, scores, counts, floors)
        return masks_from_counts(self.layers, counts, floors)


@register_method("magnitude-uniform")
class UniformMagnitude(_Magnitude):
    """The same sparsity in every layer (Han et al. 2015 style per-layer magnitude)."""

    def compute_masks(self) -> dict[str, torch.Tensor]:
        counts = {f: round(self.budget.keep * n) for f, n in self._sizes().items()}
        return self._masks(counts)


@register_method("magnitude-global")
class GlobalMagnitude(_Magnitude):
    """One magnitude threshold across all prunable layers."""

    def compute_masks(self) -> dict[str, torch.Tensor]:
        scores = {f: weight_of(m).detach().abs() for f, m in self.layers.items()}
        keep = self._keep_total()
        return select_masks(self, scores, keep, self.floors(keep))


@register_method("magnitude-erk")
class ErkMagnitude(_Magnitude):
    """Per-layer magnitude at ERK-allocated densities."""

    def compute_masks(self) -> dict[str, torch.Tensor]:
        densities = erk_densities(self.layers, self.budget.sparsity)
        counts = exact_counts(densities, self._sizes(), self._keep_total())
        return self._masks(counts)
