"""From keep masks to a removal plan: which positions of every value survive.

`resolve_keep` turns the user's `keep` (per group or per producing layer) into a mask per
group and an *own* mask per producing layer. The physical mask of a producer is its group's
mask in tied mode; in mixed mode a plain producer of a residual stream keeps its own channels.
`propagate` carries physical masks through the recorded flows: an add keeps the union of its
operands (mixed connectivity), every other join requires equal masks.

The reference for exactness is the *masked model*: the same network with each removed channel
zeroed at the output of the layer that produces it. Removed channels may still carry a
constant downstream (a BatchNorm shift through ReLU); `masked_values` runs the masked model
once so the constants reaching each consumer can be folded into its bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from compressor.errors import InputError
from compressor.surgery.groups import PRODUCING, Analysis, ChannelGroup, Key, Member
from compressor.surgery.trace import run_graph

RESIDUAL_MODES = ("tied", "mixed")


class NotExactError(InputError):
    """This model's layout makes the requested removal inexact (the CLI exits 2 on it).

    Structured methods tie a residual stream that raises it in mixed mode (see
    `compressor.surgery.streams`); the message names the layer or node and the reason.
    """


@dataclass
class Plan:
    """The resolved keep masks and the physical mask of every tracked value."""

    analysis: Analysis
    residual: str
    group_keep: list[torch.Tensor]  # per group: bool per channel
    own: dict[str, torch.Tensor]  # producing layer -> bool per group channel it keeps itself
    physical: dict[Key, torch.Tensor]  # value -> bool per position kept in the slimmed model


def make_plan(analysis: Analysis, keep: dict, residual: str) -> Plan:
    """Validate `keep` and compute every value's physical mask.

    Raises:
        InputError: Unknown key, a mask of the wrong length, a fixed channel removed, or a
            group/layer left without channels.
        NotExactError: In mixed mode, channel sets that only an add could reconcile meet
            at another op.
    """
    if residual not in RESIDUAL_MODES:
        raise InputError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    group_keep, own = resolve_keep(analysis, keep)
    plan = Plan(analysis, residual, group_keep, own, {})
    propagate(plan)
    return plan


def _as_mask(value, size: int, what: str) -> torch.Tensor:
    mask = torch.as_tensor(value)
    if mask.dtype == torch.bool:
        if mask.shape != (size,):
            raise InputError(
                f"keep mask for {what} has shape {tuple(mask.shape)}, expected ({size},)"
            )
        return mask.clone()
    if mask.dtype.is_floating_point or mask.dim() != 1:
        raise InputError(f"keep for {what} must be a bool mask or a 1-D index tensor")
    if len(mask) and (mask.min() < 0 or mask.max() >= size):
        raise InputError(f"keep indices for {what} must lie in [0, {size})")
    out = torch.zeros(size, dtype=torch.bool)
    out[mask.long()] = True
    return out


def _producer(analysis: Analysis, fqn: str) -> tuple[Member, ChannelGroup]:
    for group in analysis.groups:
        for member in group.producers:
            if member.fqn == fqn:
                return member, group
    names = [m.fqn for g in analysis.groups if g.prunable for m in g.producers]
    raise InputError(
        f"keep names {fqn!r}, which is not a layer producing removable channels; "
        f"use a group id or one of: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
    )


def resolve_keep(analysis: Analysis, keep: dict) -> tuple[list[torch.Tensor], dict]:
    """Per-group masks and per-producer own masks (both over group channels).

    A group named by id keeps its mask. A group named through layers keeps the union of the
    named layers' masks and of every channel of its unnamed plain producers; unnamed grouped
    (depthwise) convs follow the group, since they only transform its channels one to one.
    """
    by_group, by_layer = _split_keys(analysis, keep)
    group_keep, own = [], {}
    for group in analysis.groups:
        layered = {m.fqn: by_layer[m.fqn] for m in group.producers if m.fqn in by_layer}
        if group.id in by_group and layered:
            raise InputError(
                f"group {group.id} is given both by id and by layers {sorted(layered)}"
            )
        mask = _union(group, layered) if layered else by_group.get(group.id)
        mask = torch.ones(group.size, dtype=torch.bool) if mask is None else mask
        _check(group, mask, f"group {group.id}")
        for member in group.producers:
            own[member.fqn] = layered.get(member.fqn, mask)
            _check(group, own[member.fqn], f"layer {member.fqn!r}", member.index)
        group_keep.append(mask)
    return group_keep, own


def _split_keys(analysis: Analysis, keep: dict) -> tuple[dict, dict]:
    by_group: dict[int, torch.Tensor] = {}
    by_layer: dict[str, torch.Tensor] = {}
    for key, value in keep.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(analysis.groups):
                raise InputError(f"no channel group {key}; ids run 0..{len(analysis.groups) - 1}")
            by_group[key] = _as_mask(value, analysis.groups[key].size, f"group {key}")
        elif isinstance(key, str):
            member, group = _producer(analysis, key)
            positions = _as_mask(value, len(member.index), f"layer {key!r}")
            kept = torch.zeros(group.size, dtype=torch.bool)
            kept[member.index[positions]] = True
            if kept[member.index[~positions]].any():
                raise InputError(f"keep for {key!r} splits a channel group of a grouped conv")
            by_layer[key] = kept
        else:
            raise InputError(f"keep keys are group ids (int) or layer paths (str), got {key!r}")
    return by_group, by_layer


def _union(group: ChannelGroup, layered: dict) -> torch.Tensor:
    mask = group.fixed.clone()  # inputs' channels in the group stay
    for member in group.producers:
        if member.fqn in layered:
            mask[member.index] |= layered[member.fqn][member.index]
        elif member.kind == "producer":
            mask[member.index] = True
    return mask


def _check(group: ChannelGroup, mask: torch.Tensor, what: str, index=None) -> None:
    index = torch.arange(group.size) if index is None else index.unique()
    lost = index[group.fixed[index] & ~mask[index]]
    if len(lost):
        reasons = "; ".join(group.reasons) or "fixed"
        raise InputError(
            f"{what} removes channel {int(lost[0])} of group {group.id}, which cannot be "
            f"removed: {reasons}"
        )
    if not mask[index].any():
        raise InputError(f"{what} keeps no channel; keep at least one per group and layer")


def _physical_of_producer(plan: Plan, use) -> torch.Tensor:
    group_id, channels = plan.analysis.channels(use.ids)
    group = plan.analysis.groups[group_id]
    mixed = plan.residual == "mixed" and group.residual
    if mixed and use.kind == "producer":
        return plan.own[use.fqn][channels]
    if mixed:  # a grouped conv on a mixed stream follows the channels alive at its input
        in_key = dict(plan.analysis.grouped_inputs)[use.node]
        if in_key in plan.physical:
            groups = plan.analysis.traced.gm.get_submodule(use.fqn).groups
            alive = plan.physical[in_key].view(groups, -1).any(dim=1)
            return alive.repeat_interleave(len(channels) // groups)
    return plan.group_keep[group_id][channels]


def propagate(plan: Plan) -> None:
    """Fill `plan.physical` for every tracked value, in graph order."""
    analysis = plan.analysis
    producers = {use.key: use for use in analysis.uses if use.kind in PRODUCING}
    for key, track in analysis.tracks.items():
        if key in producers:
            plan.physical[key] = _physical_of_producer(plan, producers[key])
            continue
        flow = analysis.flows[key]
        phys = torch.zeros(len(track.ids), dtype=torch.bool)
        covered = torch.zeros_like(phys)
        for src, out_pos, src_pos in flow.sources:
            incoming = plan.physical[src][src_pos]
            if flow.join == "strict" and (covered[out_pos] & (phys[out_pos] != incoming)).any():
                raise NotExactError(
                    f"the operands of node '{key[0].name}' keep different channels; only an "
                    "add can join streams that keep different channels: give their "
                    "producers equal masks or use residual='tied'"
                )
            phys[out_pos] |= incoming
            covered[out_pos] = True
        phys[~covered] = True
        plan.physical[key] = phys
    _check_consistent(plan)


def _check_consistent(plan: Plan) -> None:
    """A layer sees the same channels on every call; a grouped conv's input matches its units."""
    seen: dict[tuple, torch.Tensor] = {}
    for use in plan.analysis.uses:
        phys = plan.physical.get(use.key, torch.ones(len(use.ids), dtype=torch.bool))
        ident = (use.fqn, use.kind, use.dim)
        if ident in seen and not torch.equal(seen[ident], phys):
            raise NotExactError(f"layer {use.fqn!r} is called twice on different channel sets")
        seen[ident] = phys
    for node, in_key in plan.analysis.grouped_inputs:
        out_phys = plan.physical[(node, None)]
        in_phys = plan.physical.get(in_key)
        groups = plan.analysis.traced.gm.get_submodule(node.target).groups
        if in_phys is None:
            continue
        expected = out_phys.view(groups, -1)[:, :1].expand(-1, len(in_phys) // groups)
        if not torch.equal(in_phys, expected.reshape(-1)):
            raise NotExactError(
                f"grouped conv {node.target!r} would keep channels its input removed; in "
                "mixed mode give its input's producers the same mask, or use residual='tied'"
            )


# --- the masked model ------------------------------------------------------------------------


def masked_values(plan: Plan, inputs: tuple) -> dict[fx.Node, object]:
    """Run the masked model: removed channels zeroed at their producers' outputs.

    LayerNorms over channels normalise over the kept channels only (what the slimmed
    network computes), and output zero for removed ones.
    """
    analysis = plan.analysis
    zero: dict[fx.Node, tuple[int, torch.Tensor]] = {}
    for use in analysis.uses:
        if use.kind in PRODUCING:
            group_id, channels = analysis.channels(use.ids)
            removed = (~plan.own[use.fqn][channels]).nonzero().flatten()
            if len(removed):
                zero[use.node] = (analysis.tracks[use.key].axis, removed)

    def hook(node: fx.Node, out, values: dict):
        if node in zero:
            axis, removed = zero[node]
            out = out.index_fill(axis, removed.to(out.device), 0.0)
        if node in analysis.layer_norms:
            out = _kept_layer_norm(plan, node, values[node.args[0]], out)
        return out

    return run_graph(analysis.traced.gm, inputs, hook)


def _kept_layer_norm(plan: Plan, node: fx.Node, x: torch.Tensor, out: torch.Tensor):
    kept = plan.physical[(node.args[0], None)].nonzero().flatten().to(x.device)
    if len(kept) == x.shape[-1]:
        return out
    norm = plan.analysis.traced.gm.get_submodule(node.target)
    bias = None if norm.bias is None else norm.bias[kept]
    sub = F.layer_norm(x[..., kept], (len(kept),), norm.weight[kept], bias, norm.eps)
    result = torch.zeros_like(out)
    result[..., kept] = sub
    return result


def constants(values: dict, key: Key, axis: int, positions: torch.Tensor, where: str):
    """The constant value each removed position carries in the masked model.

    Raises:
        NotExactError: A removed position varies (e.g. a constant changed at the borders by
            zero padding), so removing it cannot be exact.
    """
    value = values[key[0]] if key[1] is None else values[key[0]][key[1]]
    rows = value.index_select(axis, positions.to(value.device)).movedim(axis, 0)
    rows = rows.reshape(len(positions), -1).cpu()
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    scale = 1.0 + torch.maximum(low.abs(), high.abs())
    varying = (high - low) > 1e-6 * scale
    if varying.any():
        raise NotExactError(
            f"removed channel {int(positions[varying.nonzero()[0, 0]])} reaching {where} is not "
            "a constant in the masked model (zero padding or pooling changes it at the "
            "borders), so removing it is not exact; zero the channel after its norm layer "
            "first (compressor.surgery.mask_(..., norms=True); the structured methods gate "
            "after the last norm of a layer's conv/ReLU/BN chain), or keep the layer's "
            "channels (--exclude)"
        )
    return rows[:, 0].clone()
