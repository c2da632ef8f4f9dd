"""The graph walk that builds channel groups: a `Walker` applies one rule per node.

Rules (in `compressor.surgery.ops` and `compressor.surgery.shape_ops`) call back into the
walker to record tracked values (`emit`, `copy`), layer dimensions (`layer_in`, `layer_out`)
and fixed channels (`mix`, `pin_args`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from compressor.surgery.groups import (
    INPUT_REASON,
    Analysis,
    Flow,
    Key,
    Patch,
    Track,
    UnionFind,
    Use,
    build_groups,
)
from compressor.surgery.trace import Traced

Rule = Callable[["Walker", fx.Node], None]


class Walker:
    """Walks a traced graph once, applying each node's rule; `run()` returns the Analysis."""

    def __init__(self, traced: Traced, rule_for: Callable[[Walker, fx.Node], Rule]):
        self.traced = traced
        self.rule_for = rule_for
        self.values = traced.values
        self.modules = dict(traced.gm.named_modules())
        self.uf = UnionFind()
        self.tracks: dict[Key, Track] = {}
        self.flows: dict[Key, Flow] = {}
        self.uses: list[Use] = []
        self.patches: dict[fx.Node, Patch] = {}
        self.shared: dict[tuple[str, str], torch.Tensor] = {}
        self.residual_ids: list[torch.Tensor] = []
        self.grouped_inputs: list[tuple[fx.Node, Key]] = []
        self.layer_norms: set[fx.Node] = set()
        # a producing layer's output, or a per-channel op on its only use -> the layer's fqn
        self.produced_by: dict[fx.Node, str] = {}
        # producing layer -> the last norm on that chain: where a removed channel is zeroed
        # exactly (after BN and ReLU, before padding, pooling or the next conv)
        self.norm_after: dict[str, str] = {}

    def run(self) -> Analysis:
        for node in self.traced.gm.graph.nodes:
            self.visit(node)
        groups, channel_of = build_groups(self.uf, self.uses, self.residual_ids, self.norm_after)
        return Analysis(
            self.traced,
            groups,
            self.tracks,
            self.flows,
            self.uses,
            self.patches,
            channel_of,
            self.uf,
            self.grouped_inputs,
            self.layer_norms,
        )

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            value = self.values.get(node)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                ids = self.uf.new(value.shape[1], reason=INPUT_REASON)
                self.tracks[(node, None)] = Track(1, ids)
                self.flows[(node, None)] = Flow()
        elif node.op == "output":
            self.pin_args(node, "model output")
        elif node.op != "get_attr" and _holds_tensor(self.values.get(node)):
            self.rule_for(self, node)(self, node)

    # --- access -------------------------------------------------------------------------

    def value(self, arg):
        return self.values[arg] if isinstance(arg, fx.Node) else arg

    def track(self, arg) -> Track | None:
        return self.tracks.get((arg, None)) if isinstance(arg, fx.Node) else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def label(self, node: fx.Node) -> str:
        """The op of `node` and its name, for messages."""
        if node.op == "call_module":
            op = f"{type(self.module(node)).__name__} '{node.target}'"
        elif node.op == "call_method":
            op = f"Tensor.{node.target}"
        else:
            op = (
                str(node.target)
                if isinstance(node.target, torch._ops.OpOverload)
                else (getattr(node.target, "__name__", str(node.target)))
            )
        return f"{op} at node '{node.name}'"

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [a for a in found if _holds_tensor(self.values.get(a))]

    # --- recording ----------------------------------------------------------------------

    def emit(self, key: Key, axis: int, size: int, sources: list, join=None, alpha=1.0):
        """Record a tracked value; positions no source covers get fresh fixed ids."""
        ids = torch.full((size,), -1, dtype=torch.long)
        for src, out_pos, src_pos in sources:
            src_ids = self.tracks[src].ids[src_pos]
            current = ids[out_pos]
            empty = current < 0
            ids[out_pos[empty]] = src_ids[empty]
            if (~empty).any():
                self.uf.union(current[~empty], src_ids[~empty])
        missing = ids < 0
        if missing.any():
            ids[missing] = self.uf.new(int(missing.sum()), reason="joined with an untracked tensor")
        self.tracks[key] = Track(axis, ids)
        self.flows[key] = Flow(sources, join, alpha)
        return ids

    def copy(self, node: fx.Node, src: Key, axis: int, key: Key | None = None) -> None:
        """Output positions are the source's, possibly on another axis."""
        n = len(self.tracks[src].ids)
        self.emit(key or (node, None), axis, n, [(src, ar(n), ar(n))])
        if key is None:
            self._follow(node, src, axis)

    def _follow(self, node: fx.Node, src: Key, axis: int) -> None:
        """Extend a producer's chain through a per-channel op that is its output's only use."""
        source = src[0]
        if (
            src[1] is None
            and source in self.produced_by
            and len(source.users) == 1
            and self.tracks[src].axis == axis
        ):
            self.produced_by[node] = self.produced_by[source]

    def pin_args(self, node: fx.Node, reason: str) -> None:
        """Fix every tracked channel `node` reads."""
        for arg in self.tensor_args(node):
            value = self.values[arg]
            keys = [(arg, i) for i in range(len(value))] if isinstance(value, tuple | list) else []
            for key in [(arg, None), *keys]:
                if key in self.tracks:
                    self.uf.pin(self.tracks[key].ids, reason)

    def mix(self, node: fx.Node, why: str) -> None:
        """An op that mixes channels: its inputs are fixed, its output is untracked."""
        self.pin_args(node, f"{why}: {self.label(node)}")

    def layer_in(self, node: fx.Node, kind: str, dim: int, arg, axis: int) -> torch.Tensor:
        """Record a layer dimension that reads `arg` along `axis`."""
        value = self.value(arg)
        axis %= value.dim()
        track = self.track(arg)
        if track is not None and track.axis == axis:
            ids = track.ids
        else:
            if track is not None:
                self.uf.pin(track.ids, f"read along another dimension by {self.label(node)}")
            ids = self.uf.new(value.shape[axis], reason=f"untracked input of {self.label(node)}")
        self.share(str(node.target), "in", ids)
        if kind:
            self.uses.append(Use(str(node.target), kind, dim, (arg, None), ids, node))
        return ids

    def layer_out(self, node: fx.Node, kind: str, dim: int, axis: int) -> torch.Tensor:
        """Record a layer dimension that creates the output's channels."""
        size = self.values[node].shape[axis]
        ids = self.shared.get((str(node.target), "out"))
        if ids is None:
            ids = self.uf.new(size)
            self.shared[(str(node.target), "out")] = ids
        self.tracks[(node, None)] = Track(axis, ids)
        self.flows[(node, None)] = Flow()
        self.uses.append(Use(str(node.target), kind, dim, (node, None), ids, node))
        self.produced_by[node] = str(node.target)
        return ids

    def share(self, fqn: str, role: str, ids: torch.Tensor) -> None:
        """A layer called twice reads (or writes) the same channels each time."""
        previous = self.shared.setdefault((fqn, role), ids)
        if previous is not ids:
            self.uf.union(previous, ids)


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple | list) and any(isinstance(v, torch.Tensor) for v in value)


def op_name(node: fx.Node) -> str:
    """One name for a torch function, Tensor method and aten op: 'add', 'relu', 'cat'."""
    target = node.target
    if node.op == "call_method":
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    else:
        name = getattr(target, "__name__", "")
    return name.strip("_")


def ar(n: int) -> torch.Tensor:
    """positions 0..n-1"""
    return torch.arange(n)


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` of `node`, or its keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def first_tensor(walker: Walker, node: fx.Node) -> fx.Node | None:
    """The first argument of `node` that holds a tensor."""
    args = walker.tensor_args(node)
    return args[0] if args else None
