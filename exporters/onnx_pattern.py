"""The sparsity pattern in an ONNX graph's metadata, so a runtime can pick its sparse kernel.

Two `metadata_props` entries, both JSON text, written when the model's report names a
pattern (`report["pattern"]`, `report["pattern_layers"]`):

- ``compressor.pattern``: {initializer name: pattern text} for every weight initializer
  whose values follow the pattern in the graph as exported (checked on the initializer
  itself, so a runtime can trust it without scanning the weights);
- ``compressor.pattern_layers``: {PyTorch layer name: its weight's initializer name, or
  null when no initializer following the pattern could be matched to it}.

The dynamo exporter names a weight's initializer after its state_dict key
(``layer1.0.conv1.weight``); the TorchScript exporter folds BatchNorm into the conv before
it and names the result ``onnx::Conv_203``. Folding scales whole rows, so the zeros stay
where they were: a weight without an initializer of its name is matched to the
initializer of the same shape and the same zero positions, the first in graph order when
several tie.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compressor.pattern_layers import model_pattern, prunable_weights
from compressor.patterns import Pattern, holds

PATTERN_KEY = "compressor.pattern"
LAYERS_KEY = "compressor.pattern_layers"


def add_pattern_props_(proto: onnx.ModelProto, model: nn.Module, report: dict | None) -> dict:
    """Adds the two entries to `proto.metadata_props` (in place); returns the layer map.

    Nothing is added when the report names no pattern.
    """
    pattern, layers = model_pattern(model, report)
    if pattern is None:
        return {}
    mapping = match_initializers(proto, prunable_weights(model), layers, pattern)
    named = {init: pattern.text for init in mapping.values() if init is not None}
    for key, value in ((PATTERN_KEY, named), (LAYERS_KEY, mapping)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    return mapping


def match_initializers(
    proto: onnx.ModelProto, weights: dict[str, torch.Tensor], layers: list[str], pattern: Pattern
) -> dict[str, str | None]:
    """{layer: the initializer holding its weight and following `pattern`, or None}."""
    arrays = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    taken: set[str] = set()
    mapping: dict[str, str | None] = {}
    for layer in layers:
        weight = weights.get(f"{layer}.weight")
        found = None if weight is None else _find(arrays, taken, f"{layer}.weight", weight)
        if found is not None and not holds(torch.from_numpy(arrays[found].copy()), pattern):
            found = None
        if found is not None:
            taken.add(found)
        mapping[layer] = found
    return mapping


def _find(arrays: dict, taken: set, name: str, weight: torch.Tensor) -> str | None:
    """The initializer called `name`, else the first free one with `weight`'s shape and zeros."""
    if name in arrays and name not in taken:
        return name
    zeros = weight.float().numpy() == 0
    for candidate, array in arrays.items():
        if candidate in taken or array.shape != zeros.shape:
            continue
        if np.array_equal(array == 0, zeros):
            return candidate
    return None
