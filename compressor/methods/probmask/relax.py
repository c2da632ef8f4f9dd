"""ProbMask's math (METHODS.md §2): the schedules, the relaxed mask and the projection.

Pure tensor functions, kept apart from the method's lifecycle in probmask/__init__.py.
"""

from __future__ import annotations

import math

import torch


def keep_fraction(progress: float, target: float, start: float, end: float) -> float:
    """The scheduled keep fraction k: 1 before `start`, cubic to `target` at `end`, then flat."""
    if progress < start:
        return 1.0
    if progress >= end:
        return target
    remaining = 1.0 - (progress - start) / (end - start)
    return target + (1.0 - target) * remaining**3


def temperature(progress: float, start: float, end: float) -> float:
    """The relaxation temperature tau, linear from `start` to `end` over training."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def logistic_noise(like: torch.Tensor, eps: float) -> torch.Tensor:
    """The noise g of the relaxation, drawn from one uniform.

    The official g = -log(log u0 / log u1) is the difference of two independent standard
    Gumbel variables, which is standard-logistic distributed: logit(u) for one u ~ U(0,1)
    has exactly that distribution, at one random draw and one log instead of two and four
    (tests/test_probmask.py checks the two against each other). eps clamps u away from 0/1.
    """
    return torch.logit(torch.rand_like(like), eps=eps)


class _RelaxedMaskedWeight(torch.autograd.Function):
    """W * sigmoid((log(s + eps) - log(1 - s + eps) + g) / tau), with a hand-written backward.

    Autograd on the formula keeps five n-sized intermediates per layer; here only the mask
    m is saved, and the backward is the same derivative written out:
    dm/ds = m (1 - m) / tau * (1 / (s + eps) + 1 / (1 - s + eps)).
    """

    @staticmethod
    def forward(ctx, weight, scores, tau: float, eps: float):
        # logit(s) clamped at +-log(1/eps) equals log(s + eps) - log(1 - s + eps) in float32
        z = torch.logit(scores, eps=eps).clamp_(max=-math.log(eps))
        z += logistic_noise(scores, eps)
        mask = z.mul_(1.0 / tau).sigmoid_()
        ctx.save_for_backward(weight, scores, mask)
        ctx.tau, ctx.eps = tau, eps
        return weight * mask

    @staticmethod
    def backward(ctx, grad_out):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad_out * mask
        grad_z = torch.ops.aten.sigmoid_backward(grad_out * weight, mask)
        # (1 - s) + eps in this order, as the official log(1 - s + eps): 1 + eps rounds to 1
        denominator = (scores + ctx.eps) * (1.0 - scores).add_(ctx.eps)
        grad_scores = grad_z.div_(denominator).mul_(1.0 / ctx.tau)
        return grad_weight, grad_scores, None, None


def relaxed_masked_weight(
    weight: torch.Tensor, scores: torch.Tensor, tau: float, eps: float
) -> torch.Tensor:
    """W * m with m = sigmoid((log s - log(1 - s) + g) / tau): a relaxed Bernoulli(s) mask."""
    return _RelaxedMaskedWeight.apply(weight, scores, tau, eps)


def solve_shift(flat: torch.Tensor, budget: float, max_iter: int = 100) -> float:
    """The v >= 0 with sum(clamp(flat - v, 0, 1)) == budget (0 if already within budget).

    f(v) = sum(clamp(s - v, 0, 1)) is piecewise linear and non-increasing, so a Newton
    step inside a bisection bracket lands exactly on the root as soon as it reaches the
    right linear piece: a few passes instead of the official 20 bisections, and exact.
    Sums run in float64 so that the root is exact to float32 resolution for any n.
    """
    flat = flat.to(torch.float64)
    if float(flat.clamp(0, 1).sum()) <= budget:
        return 0.0
    tolerance = 1e-9 * max(budget, 1.0)
    low, high, v = 0.0, float(flat.max()), 0.0
    for _ in range(max_iter):
        shifted = flat - v
        gap = float(shifted.clamp(0, 1).sum()) - budget
        if abs(gap) <= tolerance:
            return v
        low, high = (v, high) if gap > 0 else (low, v)
        active = int(((shifted > 0) & (shifted < 1)).sum())
        newton = v + gap / active if active else -1.0
        v = newton if low < newton < high else 0.5 * (low + high)
        if high - low <= 1e-15 * max(high, 1.0):
            break
    return high  # f(high) <= budget always holds: the feasible end of the bracket


@torch.no_grad()
def project_scores_(scores: list[torch.Tensor], keep: float) -> float:
    """Projects scores onto {0 <= s <= 1, sum(s) <= keep * n} jointly; returns v. In place.

    The shift v is never negative, so scores <= 0 end at 0 whatever v is: the root is
    found on the positive scores alone, which at high sparsity are a small fraction.
    """
    total = sum(s.numel() for s in scores)
    positive = torch.cat([s[s > 0] for s in scores])
    v = solve_shift(positive, keep * total)
    for s in scores:
        s.sub_(v).clamp_(0.0, 1.0)
    return v
