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


def check_no_collapse(
    model: nn.Module, exclude: tuple[str, ...], method: str, already_empty: tuple[str, ...] = ()
) -> None:
    """Raises LayerCollapseError naming every prunable layer left with no weight.

    Args:
        already_empty: layers that were all zero before compression (not the method's doing).

    Raises:
        LayerCollapseError: some other layer is all zero.
    """
    empty = [fqn for fqn in empty_layers(model, exclude) if fqn not in already_empty]
    if empty:
        raise LayerCollapseError(
            f"{method} left {len(empty)} layer(s) with no non-zero weight "
            f"({', '.join(empty)}), so the output "
            "no longer depends on the input; lower the sparsity, or pass "
            "--allow-layer-collapse to accept it"
        )


class AccuracyCollapseError(CompressorError):
    """The compressed model's held-out accuracy fell to chance or below the user's floor."""


# "Near chance": at most 1.5x the chance level 1/C, and no more than a tenth of the way
# from chance to perfect (so a binary task is near chance below 55 %, not 75 %).
CHANCE_FACTOR = 1.5
CHANCE_SHARE = 0.1


def chance_ceiling(num_classes: int) -> float:
    """The accuracy at or below which a C-class model counts as at chance."""
    chance = 1.0 / num_classes
    return min(CHANCE_FACTOR * chance, chance + CHANCE_SHARE * (1.0 - chance))


def check_accuracy(
    top1: float | None,
    dense_top1: float | None,
    num_classes: int | None,
    min_accuracy: float | None = None,
) -> None:
    """Raises AccuracyCollapseError when held-out accuracy fell to chance or below a floor.

    A given `min_accuracy` replaces the chance test. The chance test applies only when
    the dense model was above it (a model that never learned the task cannot lose it).
    Nothing is checked without an accuracy.
    """
    if top1 is None:
        return
    if min_accuracy is not None:
        if top1 < min_accuracy:
            raise AccuracyCollapseError(
                f"held-out accuracy {top1:.2%} is below --min-accuracy {min_accuracy:.2%}"
                + _dense(dense_top1)
                + "; the model was not written (the report is on stderr)"
            )
        return
    if num_classes is None or num_classes < 2:
        return
    ceiling = chance_ceiling(num_classes)
    if top1 <= ceiling and dense_top1 is not None and dense_top1 > ceiling:
        raise AccuracyCollapseError(
            f"held-out accuracy {top1:.2%} is at chance level ({1 / num_classes:.2%} for "
            f"{num_classes} classes; at most {ceiling:.2%} counts as chance)"
            + _dense(dense_top1)
            + "; the model was not written (the report is on stderr); lower the budget, "
            "train longer, or pass --min-accuracy 0 to keep it anyway"
        )


def _dense(dense_top1: float | None) -> str:
    return f" (dense model: {dense_top1:.2%})" if dense_top1 is not None else ""
