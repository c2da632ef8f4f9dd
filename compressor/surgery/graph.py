"""Channel dependency graph: which channels of which layers must be removed together.

Every tensor in the traced graph has at most one *tracked axis* (channels for convs, features
for Linear). Each position along it carries an element id; ops say how output positions come
from input positions (`Flow`), and positions that must hold the same channel are unified
(union-find): the two operands of a residual add, a layer's repeated calls, the input and
output of a depthwise conv. After the walk, each union-find class is one removable *unit*;
units that appear in one layer dimension are one `ChannelGroup`.

Every layer dimension that a group touches is a `Member` whose `index[k]` names the group
channel of slice `k` along that dimension. This one representation covers concat offsets
(`index` is a shifted range), flatten into a Linear (each channel repeated H*W times), splits
and grouped convs (several slices per channel).

Channels that cannot be removed are *fixed*, with the reason: model inputs and outputs, and
channels read by an op that mixes them (a reduction over channels, a matmul, an op this module
does not know). The per-op rules live in `compressor.surgery.ops`.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.surgery.groups import (
    INPUT_REASON,
    PRODUCING,
    Analysis,
    ChannelGroup,
    Key,
    Member,
    Patch,
    Use,
    group_reduce,
)
from compressor.surgery.ops import rule_for
from compressor.surgery.trace import trace
from compressor.surgery.walker import Walker

# The data model lives in `groups`; these names stay importable from here, the public face.
__all__ = [
    "INPUT_REASON",
    "PRODUCING",
    "Analysis",
    "ChannelGroup",
    "Key",
    "Member",
    "Patch",
    "Use",
    "analyse",
    "channel_groups",
    "group_reduce",
]


def channel_groups(model: nn.Module, example_inputs: torch.Tensor | tuple) -> list[ChannelGroup]:
    """The channel groups of `model`: sets of layer dimensions that keep the same channels.

    Traces the model (torch.fx, or torch.export when fx fails) and runs it once on
    `example_inputs`. Channels read by an op that mixes them, or by an op this module does not
    know, are fixed with the reason; `slim_` refuses to remove them.

    Args:
        model: Any nn.Module; not modified.
        example_inputs: One tensor or a tuple of positional inputs (batch first).

    Returns:
        The groups, in graph order. `ChannelGroup.prunable` tells which can lose channels.

    Raises:
        CompressorError: Neither torch.fx nor torch.export can capture the model.
    """
    return analyse(model, example_inputs).groups


def analyse(model: nn.Module, example_inputs: torch.Tensor | tuple) -> Analysis:
    """Trace `model` and build its channel groups plus the per-node data surgery needs."""
    return Walker(trace(model, example_inputs), rule_for).run()
