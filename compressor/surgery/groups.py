"""The channel-group data model: element ids, union-find, members, groups (no graph walk).

The types every surgery layer shares (`Member`, `ChannelGroup`, `Use`, `Patch`, `Analysis`)
and the pure functions over them (`build_groups`, `group_reduce`). The walk that fills them
lives above, in `walker` + `ops` + `shape_ops`, and `graph.analyse` runs it; keeping the
types here is what lets those modules import them without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from compressor.surgery.trace import Traced

Key = tuple  # (fx.Node, int | None): a node's value, or one item of a node's tuple output

PRODUCING = ("producer", "grouped")
INPUT_REASON = "model input"  # why a model input's channels are fixed


@dataclass(frozen=True)
class Member:
    """One layer dimension (or tensor dimension) indexed by a group's channels.

    Attributes:
        fqn: Module path of the layer; for kind "channelwise" tensors (a parameter used in an
            element-wise op) the tensor's own path.
        kind: "producer" (weight rows + bias: Conv/Linear output), "consumer" (weight columns:
            Conv/Linear input), "grouped" (a grouped or depthwise conv, whose output rows are
            tied to its input channels), "norm" (BatchNorm/InstanceNorm/LayerNorm), or
            "channelwise" (PReLU, a per-channel parameter tensor).
        dim: The dimension of the layer's weight (or of the tensor) along which `index` runs:
            0 for Conv/Linear rows, 1 for their columns, 1 and 0 for ConvTranspose.
        index: LongTensor; `index[k]` is the group channel that slice `k` belongs to. A
            consumer after a flatten has H*W slices per channel; one after a concat has an
            offset range.
        norm: For a producer, the norm layer applied directly to its output (where a
            per-channel gate goes, e.g. BAR's), else None.
    """

    fqn: str
    kind: str
    dim: int
    index: torch.Tensor
    norm: str | None = None

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Bool mask over this member's slices, from a bool mask over group channels."""
        return channels[self.index]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together across layers.

    Attributes:
        id: Position in the list `channel_groups` returns (stable for a given model).
        size: Number of channels (removal units) in the group.
        members: Every layer dimension the group indexes, in graph order.
        fixed: Bool [size]: channels that can never be removed.
        reasons: Why channels are fixed (e.g. "model output", "unsupported op ...").
        residual: True when an add joins two streams of the group (a residual stream); in
            mixed mode its producers may keep different channels.
    """

    id: int
    size: int
    members: tuple[Member, ...]
    fixed: torch.Tensor
    reasons: tuple[str, ...] = ()
    residual: bool = False

    def of_kind(self, *kinds: str) -> list[Member]:
        """Members whose kind is one of `kinds`."""
        return [m for m in self.members if m.kind in kinds]

    @property
    def producers(self) -> list[Member]:
        """Members that create the channels: Conv/Linear rows and grouped convs."""
        return self.of_kind(*PRODUCING)

    @property
    def consumers(self) -> list[Member]:
        """Conv/Linear input dimensions reading the channels."""
        return self.of_kind("consumer")

    @property
    def norms(self) -> list[Member]:
        """BatchNorm / InstanceNorm / LayerNorm layers over the channels."""
        return self.of_kind("norm")

    @property
    def prunable(self) -> bool:
        """True when some layer produces the channels and not all of them are fixed."""
        return bool(self.producers) and not bool(self.fixed.all())


@dataclass
class Flow:
    """How a value's tracked positions come from other values.

    `sources` holds (source key, output positions, source positions). `join` is None when
    sources cover disjoint positions, "add"/"sub" for a residual add, "strict" for other
    element-wise ops whose operands must keep the same channels. `alpha` scales the second
    operand of an add (torch.add's alpha).
    """

    sources: list[tuple[Key, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    join: str | None = None
    alpha: float = 1.0


@dataclass
class Track:
    """The tracked axis of a value and the element id of each position along it."""

    axis: int
    ids: torch.Tensor


@dataclass
class Use:
    """One use of a layer dimension found during the walk (before groups exist)."""

    fqn: str
    kind: str
    dim: int
    key: Key  # the value whose positions the member indexes (output for producers)
    ids: torch.Tensor
    node: fx.Node


@dataclass
class Patch:
    """A node whose literal arguments name channel positions (view sizes, slice bounds)."""

    kind: str  # "shape", "slice", "select", "split"
    axis: int  # the tracked axis of the input (slice/select/split) or output (shape)
    info: Any = None


class UnionFind:
    """Union-find over element ids, with a `fixed` flag and reasons per element."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.reasons: dict[int, str] = {}

    def new(self, count: int, reason: str | None = None) -> torch.Tensor:
        """`count` fresh elements; fixed (with `reason`) when a reason is given."""
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.fixed.extend([reason is not None] * count)
        if reason is not None and count:
            self.reasons[start] = reason
        return torch.arange(start, start + count)

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:  # path compression
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, ids_a: torch.Tensor, ids_b: torch.Tensor) -> None:
        """Unify `ids_a[k]` with `ids_b[k]` for every k."""
        for a, b in zip(ids_a.tolist(), ids_b.tolist()):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[rb] = ra
                self.fixed[ra] = self.fixed[ra] or self.fixed[rb]

    def pin(self, ids: torch.Tensor, reason: str) -> None:
        """Mark the elements `ids` fixed, remembering why."""
        for e in ids.tolist():
            root = self.find(e)
            if not self.fixed[root]:
                self.fixed[root] = True
            self.reasons.setdefault(e, reason)

    def roots(self, ids: torch.Tensor) -> list[int]:
        return [self.find(e) for e in ids.tolist()]


@dataclass
class Analysis:
    """Everything surgery needs about one traced model (internal to compressor.surgery)."""

    traced: Traced
    groups: list[ChannelGroup]
    tracks: dict[Key, Track]
    flows: dict[Key, Flow]
    uses: list[Use]
    patches: dict[fx.Node, Patch]
    channel_of: dict[int, tuple[int, int]]  # union-find root -> (group id, channel)
    uf: UnionFind
    grouped_inputs: list[tuple[fx.Node, Key]]  # (grouped conv node, its input value)
    layer_norms: set[fx.Node]  # LayerNorm nodes over channels (statistics change on removal)

    def channels(self, ids: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """(group id, channel per position) of element ids that all lie in one group."""
        found = [self.channel_of.get(self.uf.find(e)) for e in ids.tolist()]
        if not found or any(f is None for f in found):
            return None
        group = found[0][0]
        if any(f[0] != group for f in found):
            return None
        return group, torch.tensor([f[1] for f in found], dtype=torch.long)


def build_groups(
    uf: UnionFind, uses: list[Use], residual_ids: list[torch.Tensor], norms: dict[str, str]
):
    """Turn the walk's uses into ChannelGroups; also return root -> (group, channel).

    `norms` maps a producer to the norm layer applied directly to its output.
    """
    links = UnionFind()
    links.new(len(uf.parent))
    for use in uses:
        roots = torch.tensor(uf.roots(use.ids), dtype=torch.long)
        if len(roots) > 1:
            links.union(roots[:1].expand(len(roots) - 1), roots[1:])
    ordered = sorted(range(len(uses)), key=lambda i: uses[i].kind not in PRODUCING)
    channel_of: dict[int, tuple[int, int]] = {}
    group_of_link: dict[int, int] = {}
    sizes: list[int] = []
    for i in ordered:
        for root in uf.roots(uses[i].ids):
            if root in channel_of:
                continue
            group = group_of_link.setdefault(links.find(root), len(group_of_link))
            if group == len(sizes):
                sizes.append(0)
            channel_of[root] = (group, sizes[group])
            sizes[group] += 1
    return _assemble(uf, uses, residual_ids, channel_of, sizes, norms), channel_of


def _assemble(uf, uses, residual_ids, channel_of, sizes, norms) -> list[ChannelGroup]:
    members: list[list[Member]] = [[] for _ in sizes]
    seen: set[tuple] = set()
    for use in uses:
        ident = (use.fqn, use.kind, use.dim)
        if ident in seen:
            continue  # a shared layer: its calls were unified, one member suffices
        seen.add(ident)
        found = [channel_of[r] for r in uf.roots(use.ids)]
        index = torch.tensor([c for _, c in found], dtype=torch.long)
        norm = norms.get(use.fqn) if use.kind in PRODUCING else None
        members[found[0][0]].append(Member(use.fqn, use.kind, use.dim, index, norm))
    fixed = [torch.zeros(size, dtype=torch.bool) for size in sizes]
    for root, (group, channel) in channel_of.items():
        fixed[group][channel] = uf.fixed[root]
    reasons: list[set[str]] = [set() for _ in sizes]
    for element, reason in uf.reasons.items():
        if (hit := channel_of.get(uf.find(element))) is not None:
            reasons[hit[0]].add(reason)
    residual = {channel_of[r][0] for ids in residual_ids for r in uf.roots(ids) if r in channel_of}
    return [
        ChannelGroup(
            g, sizes[g], tuple(members[g]), fixed[g], tuple(sorted(reasons[g])), g in residual
        )
        for g in range(len(sizes))
    ]


def group_reduce(
    model: nn.Module, group: ChannelGroup, kinds: tuple[str, ...] = PRODUCING, p: float = 2.0
) -> torch.Tensor:
    """Per group channel, the sum of |w|^p over the members' slices (differentiable).

    With kinds=("producer", "grouped") this is ||W^(l)[j]||_p^p summed over the layers that
    produce channel j; with ("consumer",) it is ||W^(l+1)[:, j]||_p^p over its readers: the
    two halves of a GSS group (METHODS.md §4). Biases are not included.

    Args:
        model: The model the group was computed on (parameters are looked up by fqn).
        group: A group from `channel_groups(model, ...)`.
        kinds: Member kinds to include.
        p: The norm order.
    """
    total = None
    for member in group.of_kind(*kinds):
        weight = _member_tensor(model, member)
        slices = weight.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
        per_slice = slices.abs().pow(p).sum(dim=1)
        part = per_slice.new_zeros(group.size).index_add(0, member.index, per_slice)
        total = part if total is None else total + part
    return total if total is not None else torch.zeros(group.size)


def _member_tensor(model: nn.Module, member: Member) -> torch.Tensor:
    """The layer's weight, or for a per-channel tensor member the tensor itself."""
    try:
        return model.get_submodule(member.fqn).weight
    except AttributeError:  # not a module: a parameter/buffer path such as "block.scale"
        prefix, _, name = member.fqn.rpartition(".")
        return getattr(model.get_submodule(prefix) if prefix else model, name)
