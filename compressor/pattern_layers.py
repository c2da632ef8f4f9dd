"""Which layers of a model carry its sparsity pattern, and whether they still follow it.

A model pruned to a pattern names it in its report: `report["pattern"]` (the text, e.g.
"2:4" or "1x4") and `report["pattern_layers"]` (the layer names, as in the masks, whose
`<name>.weight` was pruned to it). The exporters pack and annotate those layers; `compress
info` shows whether each still follows the pattern (fine-tuning or editing a weight can
break it).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.masks import prunable_layers
from compressor.patterns import Pattern, holds, parse_pattern


def model_pattern(model: nn.Module, report: dict | None) -> tuple[Pattern | None, list[str]]:
    """The model's pattern and the layer names pruned to it, from its report.

    A report naming a pattern but no `pattern_layers` means every layer that follows it.

    Raises:
        InputError: the report's pattern is not one `parse_pattern` reads.
    """
    text = (report or {}).get("pattern")
    if not text:
        return None, []
    pattern = parse_pattern(text)
    layers = (report or {}).get("pattern_layers")
    if layers is None:
        weights = prunable_weights(model)
        layers = [n[: -len(".weight")] for n, w in weights.items() if holds(w, pattern)]
    return pattern, [str(name) for name in layers]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`NAME.weight` -> weight of every Conv/Linear layer with a float weight of rank >= 2."""
    out = {}
    for fqn, module in prunable_layers(model).items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() >= 2:
            out[f"{fqn}.weight" if fqn else "weight"] = weight.detach().cpu()
    return out


def pattern_holds(model: nn.Module, report: dict | None) -> dict[str, bool]:
    """{layer of `report["pattern_layers"]`: whether its weight follows the pattern}.

    A layer without a Conv/Linear weight counts as not following. Empty without a pattern.
    """
    pattern, layers = model_pattern(model, report)
    weights = prunable_weights(model)
    return {
        layer: f"{layer}.weight" in weights and holds(weights[f"{layer}.weight"], pattern)
        for layer in layers
    }
