"""Structured surgery: the channel dependency graph and physical channel removal.

    groups = channel_groups(model, x)            # which layer dimensions share channels
    keep = {g.id: mask for g in groups if g.prunable}  # or {"layer1.0.conv2": mask, ...}
    mask_(model, keep, x, norms=True)            # optional: zero them in place, same shapes
    result = slim_(model, keep, x)               # residual="tied" | "mixed"
    result.model(x)  # == the masked model's output (removed channels zeroed at producers)

Modules, in layers (each imports only the ones before it; tests/test_architecture.py checks):
`layers` / `mixed` / `remove` (the modules surgery inserts, per-layer-type slicing), `trace`
(fx / torch.export graph + recorded values), `groups` (members, groups, union-find: the data
model), `walker` + `shape_ops` + `ops` (per-op channel rules), `graph` (the walk: analyse,
channel_groups), `plan` (keep masks -> kept positions, masked-model constants), `rewrite`
(code changes: joins, literal sizes), `slim` (slim_ / mask_), then `pins`, `streams`,
`select`; and the cost engine on top: `cost` (exact params / FLOPs / volume of a keep
dict), `latency` (a per-layer latency table) and `fit` (the one budget fitter).
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
