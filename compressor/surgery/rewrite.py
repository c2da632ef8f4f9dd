"""Rewrite the forward code where slimming changes it: mixed joins and literal arguments.

Slicing layers changes no code, but two things do: a residual add whose operands keep
different channels becomes a `ResidualJoin` module, and literal arguments that name channel
sizes or positions (`x.view(n, 800)`, `x[:, 4:]`, `torch.split(x, [4, 4], 1)`) get their new
values. Each change is an `Action` computed on the traced graph before anything is modified.

Actions are applied where the code lives. A node created in the forward of a submodule (a
ResNet block, say) is rewritten in a fresh fx trace of that submodule, which then replaces it
in its parent, so the model is changed in place. Nodes in the root's own forward, or in a
submodule called twice, need the whole graph: the slimmed model is then the traced
GraphModule (a new object sharing the model's layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from compressor.errors import CompressorError
from compressor.surgery.mixed import ResidualJoin
from compressor.surgery.plan import NotExactError, Plan, constants
from compressor.surgery.trace import Traced, scope_of, symbolic_trace
from compressor.surgery.walker import op_name

Action = Callable[[fx.GraphModule, fx.Node], None]


def plan_rewrites(plan: Plan, values: dict) -> dict[fx.Node, Action]:
    """The code changes slimming needs, keyed by node of the traced graph.

    Raises:
        CompressorError: A change is impossible (a slice or split piece left empty, a mixed
            join of operands with different shapes, a removed channel that is not constant).
    """
    actions: dict[fx.Node, Action] = {}
    for key, flow in plan.analysis.flows.items():
        if flow.join in ("add", "sub"):
            action = _join(plan, key[0], flow, values)
            if action is not None:
                actions[key[0]] = action
    for node, patch in plan.analysis.patches.items():
        builder = {"shape": _shape, "slice": _slice, "select": _select, "split": _split}
        action = builder[patch.kind](plan, node, patch, values)
        if action is not None:
            actions[node] = action
    return actions


def _join(plan: Plan, node: fx.Node, flow, values: dict) -> Action | None:
    out = plan.physical[(node, None)]
    (src_a, _, _), (src_b, _, _) = flow.sources
    phys_a, phys_b = plan.physical[src_a], plan.physical[src_b]
    if torch.equal(phys_a, out) and torch.equal(phys_b, out):
        return None
    axis = plan.analysis.tracks[(node, None)].axis
    if values[src_a[0]].shape != values[src_b[0]].shape:
        raise NotExactError(f"mixed join at node '{node.name}' needs operands of equal shape")
    alpha = flow.alpha * (-1.0 if flow.join == "sub" else 1.0)
    const = torch.zeros(len(out), dtype=values[src_a[0]].dtype)
    for sign, src, phys in ((1.0, src_a, phys_a), (alpha, src_b, phys_b)):
        missing = (out & ~phys).nonzero().flatten()
        if len(missing):
            where = f"the add at node '{node.name}'"
            const[missing] += sign * constants(values, src, axis, missing, where)
    compact = torch.cumsum(out.long(), 0) - 1
    pos_a = None if torch.equal(phys_a, out) else compact[phys_a]
    pos_b = None if torch.equal(phys_b, out) else compact[phys_b]
    kept_const = const[out]
    module = ResidualJoin(
        axis, int(out.sum()), pos_a, pos_b, alpha, kept_const if kept_const.any() else None
    ).to(values[src_a[0]].device)
    index_a, index_b = node.args.index(src_a[0]), node.args.index(src_b[0])

    def action(gm: fx.GraphModule, target: fx.Node) -> None:
        name = _unique(gm, f"join_{target.name}")
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(target):
            new = gm.graph.call_module(name, (target.args[index_a], target.args[index_b]))
        target.replace_all_uses_with(new)
        gm.graph.erase_node(target)

    return action


def _unique(gm: nn.Module, name: str) -> str:
    while hasattr(gm, name):
        name += "_"
    return name


def _shape(plan: Plan, node: fx.Node, patch, values: dict) -> Action | None:
    new = int(plan.physical[(node, None)].sum())
    if new == values[node].shape[patch.axis]:
        return None
    axis = patch.axis

    def action(gm: fx.GraphModule, target: fx.Node) -> None:
        args = list(target.args)
        if op_name(target) == "unflatten":
            start = args[1] % values[node].dim()
            sizes = list(args[2])
            if start <= axis < start + len(sizes) and _literal(sizes[axis - start]):
                sizes[axis - start] = new
            args[2] = type(args[2])(sizes)
        elif len(args) > 1 and isinstance(args[1], list | tuple):
            sizes = list(args[1])
            if _literal(sizes[axis]):
                sizes[axis] = new
            args[1] = type(args[1])(sizes)
        elif _literal(args[1 + axis]):
            args[1 + axis] = new
        target.args = tuple(args)

    return action


def _literal(size) -> bool:
    return isinstance(size, int) and size != -1


def _new_range(plan: Plan, node: fx.Node, key=None) -> tuple[int, int]:
    """(start, length) of a contiguous step-1 slice of channels after slimming."""
    src, _, positions = plan.analysis.flows[key or (node, None)].sources[0]
    kept = plan.physical[src]
    count = int(plan.physical[key or (node, None)].sum())
    if count == 0:
        raise CompressorError(f"node '{node.name}' would keep no channel of its input")
    return int(kept[: int(positions[0])].sum()), count


def _slice(plan: Plan, node: fx.Node, patch, values: dict) -> Action | None:
    start, count = _new_range(plan, node)
    form, hit = patch.info

    def action(gm: fx.GraphModule, target: fx.Node) -> None:
        args = list(target.args)
        if form == "getitem":
            items = list(args[1]) if isinstance(args[1], tuple) else [args[1]]
            items[hit] = slice(start, start + count)
            args[1] = tuple(items) if isinstance(args[1], tuple) else items[0]
        elif form == "narrow":
            args[2:4] = [start, count]
        else:  # aten.slice.Tensor(x, dim, start, end, step)
            args = [*args[:2], start, start + count, 1]
        target.args = tuple(args)

    return action


def _select(plan: Plan, node: fx.Node, patch, values: dict) -> Action | None:
    form, hit = patch.info
    x = node.args[0]
    old = (
        node.args[1][hit]
        if form == "getitem" and isinstance(node.args[1], tuple)
        else (node.args[1] if form == "getitem" else node.args[2])
    )
    kept = plan.physical[(x, None)]
    new = int(kept[: old % len(kept)].sum())

    def action(gm: fx.GraphModule, target: fx.Node) -> None:
        args = list(target.args)
        if form == "getitem" and isinstance(args[1], tuple):
            args[1] = tuple(new if i == hit else item for i, item in enumerate(args[1]))
        elif form == "getitem":
            args[1] = new
        else:
            args[2] = new
        target.args = tuple(args)

    return action


def _split(plan: Plan, node: fx.Node, patch, values: dict) -> Action | None:
    sizes = [int(plan.physical[(node, i)].sum()) for i in range(len(values[node]))]
    if 0 in sizes:
        raise CompressorError(f"a piece of split node '{node.name}' would keep no channel")
    if sizes == [piece.shape[patch.axis] for piece in values[node]]:
        return None
    axis = patch.axis

    def action(gm: fx.GraphModule, target: fx.Node) -> None:
        with gm.graph.inserting_before(target):
            new = gm.graph.call_function(torch.split, (target.args[0], sizes), {"dim": axis})
        target.replace_all_uses_with(new)
        gm.graph.erase_node(target)

    return action


# --- applying actions where the code lives ------------------------------------------------


def apply_rewrites(
    traced: Traced, model: nn.Module, actions: dict[fx.Node, Action]
) -> tuple[nn.Module, list[str]]:
    """Apply `actions`; return the slimmed model and the module paths that were rewritten."""
    if not actions and traced.source != "export":
        return model, []
    if traced.source == "fx":
        targets = _submodule_targets(traced, model, actions)
        if targets is not None:
            for scope, (sub, mapping) in targets.items():
                for node, action in actions.items():
                    if node in mapping:
                        action(sub, mapping[node])
                _finish(sub)
                _replace(model, scope, sub)
            return model, sorted(targets)
    for node, action in actions.items():
        action(traced.gm, node)
    _finish(traced.gm)
    if traced.gm is not model and hasattr(model, "input_shape"):
        traced.gm.input_shape = model.input_shape
    return traced.gm, [""]


def _submodule_targets(traced: Traced, model: nn.Module, actions) -> dict | None:
    """Per outermost submodule holding an action: (its fresh trace, flat node -> its node)."""
    scopes = {scope_of(node) for node in actions}
    if None in scopes or "" in scopes:
        return None
    outermost = {s for s in scopes if not any(s.startswith(o + ".") for o in scopes)}
    targets = {}
    for scope in outermost:
        try:
            sub = symbolic_trace(model.get_submodule(scope))
        except Exception:  # traced as part of the model, but not alone: use the root graph
            return None
        mapping = _map_nodes(traced.gm.graph, scope, sub)
        if mapping is None:
            return None
        targets[scope] = (sub, mapping)
    return targets


def _map_nodes(flat: fx.Graph, scope: str, sub: fx.GraphModule) -> dict | None:
    """Match the flat graph's nodes inside `scope` with the submodule's own trace, in order."""
    inside = [n for n in flat.nodes if scope in _paths(n)]
    own = [n for n in sub.graph.nodes if n.op not in ("placeholder", "output")]
    if len(inside) != len(own):
        return None  # e.g. the submodule is called twice
    for a, b in zip(inside, own):
        qualified = f"{scope}.{b.target}" if b.op in ("call_module", "get_attr") else b.target
        if a.op != b.op or a.target != qualified:
            return None
    return dict(zip(inside, own))


def _paths(node: fx.Node) -> list[str]:
    return [value[0] for value in (node.meta.get("nn_module_stack") or {}).values()]


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()


def _replace(model: nn.Module, scope: str, sub: nn.Module) -> None:
    parent, _, name = scope.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, sub)
