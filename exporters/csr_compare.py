"""Comparing a pack's rebuilt tensors with the model's: bits, largest error, outputs."""

from __future__ import annotations

import torch
from torch import nn

from exporters._common import eval_mode, flat_outputs


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits, up to the sign of zero (-0.0 == +0.0; NaN == same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    a, b = (t.masked_fill(t == 0, 0).contiguous().view(width) for t in (a, b))
    return torch.equal(a, b)


def max_error(original: torch.Tensor, rebuilt: torch.Tensor) -> float:
    """Largest |original - rebuilt| (inf when integer tensors differ at all)."""
    if not original.is_floating_point():
        return 0.0 if torch.equal(original, rebuilt) else float("inf")
    if original.numel() == 0:
        return 0.0
    return float((original.double() - rebuilt.double()).abs().max())


def output_diff(model: nn.Module, rebuilt: dict, example: tuple) -> float:
    """Max |outputs with the rebuilt tensors - outputs with the model's own| on `example`."""
    # functional_call swaps the tensors in for one call: no copy of the model (deep-copying
    # a lifted .pt2 graph is slow and warns), and the model is left as it was.
    # buffers outside the state_dict (persistent=False: derived, e.g. a join's gather index)
    # are not in a pack; the model's own serve, so strict still catches any stored one missing
    derived = {k: v for k, v in model.named_buffers() if k not in model.state_dict()}
    with eval_mode(model), torch.no_grad():
        expected = flat_outputs(model, example)
        out = torch.func.functional_call(model, derived | rebuilt, example, strict=True)
    got = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return max(
        (float((e.double() - g.double()).abs().max()) for e, g in zip(expected, got) if e.numel()),
        default=0.0,
    )
