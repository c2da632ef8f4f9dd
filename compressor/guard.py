"""Postconditions that tell a destroyed model from a compressed one.

A prunable layer whose weights are all zero passes nothing of the input on; what follows
it sees a constant. DESIGN.md: "a result that destroys the model is a failure, not a
result".
"""

from __future__ import annotations

from torch import nn

from compressor.errors import CompressorError
from compressor.masks import prunable_layers


class LayerCollapseError(CompressorError):
    """A method left a prunable layer with no non-zero weight."""


def empty_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """The prunable layers (outside `exclude`) whose weights are all zero."""
    return [
        fqn
        for fqn, module in prunable_layers(model, exclude).items()
        if module.weight.numel() and not bool(module.weight.detach().any())
    ]


def check_no_collapse(model: nn.Module, exclude: tuple[str, ...], method: str) -> None:
    """Raises LayerCollapseError naming every prunable layer left with no weight.

    Raises:
        LayerCollapseError: some layer is all zero.
    """
    empty = empty_layers(model, exclude)
    if empty:
        raise LayerCollapseError(
            f"{method} left {len(empty)} layer(s) with no non-zero weight "
            f"({', '.join(empty)}), so the output "
            "no longer depends on the input; lower the sparsity, or pass "
            "--allow-layer-collapse to accept it"
        )
