"""The floor of a CSR pack: the fewest bytes a runtime needs to hold the model's weights.

docs/csr-format.md section 8 defines it; in short, per tensor of the state_dict:

- a weight pruned to N:M (a pattern layer of the report that follows it): N value slots
  per M-column group at the value precision, plus ceil(log2 M) index bits per slot (the
  hardware layout, e.g. NVIDIA's 2:4 metadata: 2 bits per kept value), rounded up to a
  whole byte per weight;
- a weight pruned to RxC blocks: the real elements of its non-zero blocks (edge blocks
  count only the elements inside the matrix) at the value precision, one block-column
  index per kept block in the narrowest of uint8 / uint16 / int32, and int32 row pointers
  (ceil(rows / R) + 1 of them);
- int8 values add one float32 scale per row of each of those;
- any other Conv/Linear weight: the smaller of its dense bytes and its plain CSR bytes
  (the choice the pack makes with `layers="auto"`);
- every other tensor (biases, BatchNorm) its raw bytes.

The floor leaves out the file's header (the safetensors JSON): its size depends on how
many tensors a model has and on the names, not on the weights; `floor_report` states it
beside the floor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.pattern_layers import model_pattern, prunable_weights
from compressor.patterns import Pattern, group_sums, holds
from exporters.csr_format import index_dtype

VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
INDEX_BYTES = {"U8": 1, "U16": 2, "I32": 4}
SCALE_BYTES = 4  # one float32 per row (int8 values)
ROW_PTR_BYTES = 4  # int32 row pointers


def pack_floor(model: nn.Module, report: dict | None, values: str = "fp32") -> int:
    """The floor, in bytes, of a pack of `model` at `values` precision (module docstring).

    Args:
        model: the pruned model.
        report: its report; `report["pattern"]` and `report["pattern_layers"]` say which
            weights count at the pattern's floor (without them, every weight is plain CSR).
        values: "fp32", "fp16" or "int8".
    """
    pattern, layers = model_pattern(model, report)
    pattern_names = {f"{layer}.weight" for layer in layers}
    weights = prunable_weights(model)
    total = 0
    for name, tensor in model.state_dict().items():
        dense = tensor.numel() * tensor.element_size()
        if name not in weights:
            total += dense
            continue
        # the pack stores every block-pattern layer in blocks; an N:M one only if it follows
        follows = name in pattern_names and (pattern.kind == "block" or holds(tensor, pattern))
        total += min(
            dense, weight_floor(tensor.detach().cpu(), pattern if follows else None, values)
        )
    return total


def weight_floor(weight: torch.Tensor, pattern: Pattern | None, values: str) -> int:
    """The floor of one weight in `pattern` (None: plain CSR) at `values` precision."""
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    value_bytes = VALUE_BYTES[values]
    scales = rows * SCALE_BYTES if values == "int8" else 0
    if pattern is not None and pattern.kind == "nm":
        slots = rows * cols // pattern.b * pattern.a
        bits = max(1, (pattern.b - 1).bit_length())
        return slots * value_bytes + -(-slots * bits // 8) + scales
    height, width = pattern.group if pattern is not None else (1, 1)
    nonzero = (weight != 0).to(torch.float32)
    counts = group_sums(nonzero, Pattern("block", height, width))
    sizes = group_sums(torch.ones_like(nonzero), Pattern("block", height, width))
    kept = counts > 0
    elements = int(sizes[kept].sum())
    blocks = int(kept.sum())
    index = INDEX_BYTES[index_dtype(-(-cols // width))]
    row_ptr = (-(-rows // height) + 1) * ROW_PTR_BYTES
    return elements * value_bytes + blocks * index + row_ptr + scales


def floor_report(pack, model: nn.Module, report: dict | None) -> dict:
    """A written pack against its floor: bytes of each and the ratios, header in and out."""
    floor = pack_floor(model, report, pack.values)
    data = pack.size_bytes - pack.header_bytes
    return {
        "floor_bytes": floor,
        "pack_bytes": pack.size_bytes,
        "header_bytes": pack.header_bytes,
        "data_bytes": data,
        "data_ratio": data / floor,
        "file_ratio": pack.size_bytes / floor,
    }
