"""FCPTS's bridge: a differentiable stand-in for "layer sparsity as a function of threshold".

The layer sparsity `r(t) = mean(|W| < t)` is a step function of the threshold `t`, so its
true derivative is zero almost everywhere. FCPTS (METHODS.md §1) supplies the derivative
of the *smoothed* sparsity instead: with p the density of the layer's weights,
`r(t) = P(-t < W < t)` and so `dr/dt = p(t) + p(-t)`. Two estimates of p are offered:

* ``histogram`` (the official code): a 100-bin histogram of W over [min W, max W];
* ``kde`` (the paper): a Gaussian kernel density estimate on the weights standardised by
  their mean and std, from 100 points with bandwidth 0.5 (a bandwidth only meaningful in
  std units, hence the standardisation and the change of variables back to raw units).
"""

from __future__ import annotations

import math

import torch

DENSITIES = ("histogram", "kde")


def histogram_density(weights: torch.Tensor, at: torch.Tensor, bins: int) -> torch.Tensor:
    """Density of `weights` at the points `at`, from a `bins`-bin histogram over its range.

    Points outside [min, max] get density 0, as in the official code.
    """
    flat = weights.detach().flatten().float()
    extremes = torch.aminmax(flat)  # one pass over the layer rather than two
    low, high = float(extremes.min), float(extremes.max)
    if high <= low:  # a constant layer has no spread: no density anywhere but a point
        return torch.zeros_like(at)
    counts = torch.histc(flat, bins=bins, min=low, max=high)
    width = (high - low) / bins
    density = counts / (width * flat.numel())
    index = torch.floor((at - low) / width).long()
    inside = (index >= 0) & (index < bins)
    return torch.where(inside, density[index.clamp(0, bins - 1)], torch.zeros_like(at))


def kde_density(
    weights: torch.Tensor, at: torch.Tensor, points: int, bandwidth: float
) -> torch.Tensor:
    """Gaussian-KDE density of `weights` at `at`, estimated in std units (the paper's form).

    The `points` kernel centres are the standardised weights' quantiles at (k + 0.5) / points:
    a deterministic stand-in for the paper's random sample of 100 points, so that runs are
    reproducible and the estimate does not depend on which weights a draw happens to pick.
    """
    flat = weights.detach().flatten().double()
    mean, std = flat.mean(), flat.std()
    if not std > 0:
        return torch.zeros_like(at)
    # order statistics rather than torch.quantile, which refuses tensors above 2^24 elements
    ordered = torch.sort((flat - mean) / std).values
    levels = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    centres = ordered[(levels * ordered.numel()).long().clamp(max=ordered.numel() - 1)]
    standard = ((at.double() - mean) / std).reshape(-1, 1)
    kernels = torch.exp(-0.5 * ((standard - centres) / bandwidth) ** 2)
    density_std_units = kernels.mean(dim=1) / (bandwidth * math.sqrt(2.0 * math.pi))
    # change of variables u = (w - mean) / std: p_W(w) = p_U(u) / std
    return (density_std_units / std).reshape(at.shape).to(at.dtype)


def sparsity_slope(
    weights: torch.Tensor,
    threshold: torch.Tensor,
    density: str = "histogram",
    *,
    bins: int = 100,
    kde_points: int = 100,
    kde_bandwidth: float = 0.5,
) -> torch.Tensor:
    """The bridge's derivative `dr/dt = p(t) + p(-t)` for one layer."""
    at = torch.stack([threshold.detach(), -threshold.detach()]).float()
    if density == "histogram":
        values = histogram_density(weights, at, bins)
    elif density == "kde":
        values = kde_density(weights, at, kde_points, kde_bandwidth)
    else:
        raise ValueError(f"density {density!r} is not one of {DENSITIES}")
    return values.sum().to(threshold.dtype)


class SparsityBridge(torch.autograd.Function):
    """`r = mean(|W| < t)` forward; `dr/dt = p(t) + p(-t)` backward (no gradient to W)."""

    @staticmethod
    def forward(ctx, threshold, weights, density, bins, kde_points, kde_bandwidth):
        ctx.save_for_backward(threshold, weights)
        ctx.options = (density, bins, kde_points, kde_bandwidth)
        return (weights.detach().abs() < threshold).float().mean().to(threshold.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        threshold, weights = ctx.saved_tensors
        density, bins, kde_points, kde_bandwidth = ctx.options
        slope = sparsity_slope(
            weights,
            threshold,
            density,
            bins=bins,
            kde_points=kde_points,
            kde_bandwidth=kde_bandwidth,
        )
        return grad_output * slope, None, None, None, None, None


def layer_sparsity(
    threshold: torch.Tensor,
    weights: torch.Tensor,
    density: str = "histogram",
    *,
    bins: int = 100,
    kde_points: int = 100,
    kde_bandwidth: float = 0.5,
) -> torch.Tensor:
    """The layer's sparsity at `threshold`, differentiable in `threshold` through the bridge."""
    if density not in DENSITIES:
        raise ValueError(f"density {density!r} is not one of {DENSITIES}")
    return SparsityBridge.apply(threshold, weights, density, bins, kde_points, kde_bandwidth)
