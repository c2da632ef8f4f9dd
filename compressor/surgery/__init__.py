"""Structured surgery: the channel dependency graph and physical channel removal.

    groups = channel_groups(model, x)            # which layer dimensions share channels
    keep = {g.id: mask for g in groups if g.prunable}  # or {"layer1.0.conv2": mask, ...}
    mask_(model, keep, x, norms=True)            # optional: zero them in place, same shapes
    result = slim_(model, keep, x)               # residual="tied" | "mixed"
    result.model(x)  # == the masked model's output (removed channels zeroed at producers)

Modules: `trace` (fx / torch.export graph + recorded values), `graph` (groups, members),
`walker` + `ops` + `shape_ops` (per-op channel rules), `plan` (keep masks -> kept positions,
masked-model constants), `remove` (per-layer-type slicing), `mixed` (ResidualJoin),
`rewrite` (code changes: joins, literal sizes), `slim` (slim_ / mask_), and the cost engine:
`cost` (exact params / FLOPs / volume of a keep dict) and `fit` (one budget fitter).
Methods decide what to keep; this package alone changes tensor shapes (DESIGN.md).
"""

from compressor.surgery.graph import ChannelGroup, Member, channel_groups, group_reduce
from compressor.surgery.mixed import ResidualJoin
from compressor.surgery.slim import SlimResult, mask_, slim_

__all__ = [
    "ChannelGroup",
    "Member",
    "ResidualJoin",
    "SlimResult",
    "channel_groups",
    "group_reduce",
    "mask_",
    "slim_",
]
