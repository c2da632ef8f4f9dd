"""`slim_` and `mask_`: physically remove channels, or zero them in place.

The contract (DESIGN.md: "the slimmed network's output equals the gated/masked network's
output"): `slim_(model, keep, x)` returns a network whose output equals, on any input, the
output of the *masked model*, i.e. `model` with every removed channel zeroed at the output of
the layer producing it. Constants such channels still carry downstream (a BatchNorm shift
through ReLU) are folded into the next layer's bias where that is exact (a Linear, or a conv
without zero padding); elsewhere `slim_` raises instead of returning an approximation. Zeroing
the channels' norm parameters too (`mask_(..., norms=True)`, or a gate placed after the norm
as BAR does) makes the constants zero, so any consumer can then be slimmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.masks import has_machinery
from compressor.surgery import remove
from compressor.surgery.graph import PRODUCING, analyse
from compressor.surgery.mixed import ResidualJoin
from compressor.surgery.plan import NotExactError, Plan, constants, make_plan, masked_values
from compressor.surgery.rewrite import apply_rewrites, plan_rewrites
from compressor.surgery.trace import as_tuple, eval_mode, output_values

Keep = dict  # {group id (int) or producing layer path (str): bool mask or index tensor}


@dataclass
class SlimResult:
    """The slimmed model and what was removed.

    `model` is the given model, changed in place, unless the forward code of the root module
    had to change (mixed joins or literal sizes in the root's own forward, or a model fx cannot
    trace): it is then a torch.fx.GraphModule sharing the slimmed layers. Always use it.
    """

    model: nn.Module
    report: dict = field(default_factory=dict)


def slim_(
    model: nn.Module, keep: Keep, example_inputs: torch.Tensor | tuple, residual: str = "tied"
) -> SlimResult:
    """Remove channels physically; the result computes exactly what the masked model does.

    Modifies `model` in place (its layers, and submodules whose forward must change).

    Args:
        model: The network; no parametrizations (masks) may be installed on it.
        keep: {group id: mask over the group's channels} and/or {producing layer path: mask
            over its output channels}; a mask is a bool tensor or a tensor of kept indices.
            Groups not named keep everything; a group is named either by id or through its
            producing layers, not both. Through layers, a group keeps the union of the named
            layers' masks and all channels of its unnamed plain producers (unnamed depthwise
            convs follow the group). In tied mode, rows a layer drops but its group keeps
            are zeroed rather than removed. Every group and layer keeps >= 1 channel.
        example_inputs: A tensor or tuple of tensors the model runs on (batch first).
        residual: "tied": every producer of a residual stream keeps the group's channels.
            "mixed": each producer of a residual stream keeps its own channels and adds
            become index_add joins (METHODS.md §3); a depthwise conv on such a stream follows
            the channels alive at its input.

    Returns:
        SlimResult(model, report): report lists kept channels per group, layer shapes
        before/after, zeroed rows, folded constants and rewritten modules. A LayerNorm over
        removed features renormalises over the kept ones (its masked reference is defined
        that way); every other layer is exact.

    Raises:
        InputError: Bad keys or masks, a fixed channel removed, a group or layer left empty.
        NotExactError: (an InputError) A removal cannot be exact on this layout (a varying
            removed channel, a constant into a padded conv, different channel sets meeting
            at an op other than an add); the model is unchanged.
        CompressorError: The model has masks installed or cannot be traced; the model is
            unchanged in these cases.
    """
    inputs = as_tuple(example_inputs)
    if machinery := has_machinery(model):
        raise CompressorError(f"strip the masks first (compressor.masks.strip_): {machinery}")
    analysis = analyse(model, inputs)
    plan = make_plan(analysis, keep, residual)
    values = masked_values(plan, inputs)
    reference = output_values(analysis.traced.gm, values)
    folds = _plan_folds(plan, values)
    actions = plan_rewrites(plan, values)  # every check above runs before any change
    report = _report(plan, folds)
    _apply(plan, folds, model, report)
    result, rewritten = apply_rewrites(analysis.traced, model, actions)
    report.update(joins=_count_joins(result), patched=len(actions), rewritten=rewritten)
    check_same(result, inputs, reference)
    return SlimResult(result, report)


def mask_(
    model: nn.Module,
    keep: Keep,
    example_inputs: torch.Tensor | tuple,
    residual: str = "tied",
    norms: bool = False,
) -> nn.Module:
    """Zero the removed channels in place, keeping all shapes: the masked model as weights.

    Zeroes each producer's removed output rows and biases. With `norms=True` also zeroes
    the weight and bias of norm layers over removed channels, so removed channels are exactly
    zero downstream (what a gate after the norm does); through activations with f(0) = 0
    (ReLU, ReLU6, GELU, ...) `slim_` of the result then never needs to fold a constant.
    Arguments are those of `slim_`.

    Returns:
        `model`.
    """
    inputs = as_tuple(example_inputs)
    plan = make_plan(analyse(model, inputs), keep, residual)
    for use, channels in _producer_uses(plan):
        removed = (~plan.own[use.fqn][channels]).nonzero().flatten()
        if len(removed):
            remove.zero_outputs_(model.get_submodule(use.fqn), use.dim, removed)
    if norms:
        for use in plan.analysis.uses:
            if (
                use.kind == "norm"
                and (removed := (~plan.physical[use.key]).nonzero().flatten()).numel()
            ):
                remove.zero_channelwise_(model.get_submodule(use.fqn), removed)
    return model


def _producer_uses(plan: Plan):
    seen = set()
    for use in plan.analysis.uses:
        if use.kind in PRODUCING and use.fqn not in seen:
            seen.add(use.fqn)
            yield use, plan.analysis.channels(use.ids)[1]


def _plan_folds(plan: Plan, values: dict) -> dict[str, tuple]:
    """Constants the removed inputs of each consumer carry: {layer: (dim, slices, values)}."""
    gm = plan.analysis.traced.gm
    folds: dict[str, tuple] = {}
    for use in plan.analysis.uses:
        phys = plan.physical.get(use.key)
        if use.kind != "consumer" or phys is None or phys.all():
            continue
        removed = (~phys).nonzero().flatten()
        axis = plan.analysis.tracks[use.key].axis
        carried = constants(values, use.key, axis, removed, f"layer {use.fqn!r}")
        if not carried.any():
            continue
        if remove.padded(gm.get_submodule(use.fqn)):
            raise NotExactError(
                f"removed input channels of {use.fqn!r} carry a nonzero constant (e.g. a "
                "BatchNorm shift through ReLU), which its zero padding makes impossible to "
                "fold exactly; zero those channels after their norm layer first "
                "(compressor.surgery.mask_(..., norms=True); the structured methods do), or "
                "keep them (--exclude)"
            )
        previous = folds.get(use.fqn)
        if previous is not None and not torch.equal(previous[2], carried):
            raise NotExactError(f"layer {use.fqn!r} is shared and sees different constants")
        folds[use.fqn] = (use.dim, removed, carried)
    return folds


def _apply(plan: Plan, folds: dict, model: nn.Module, report: dict) -> None:
    """Fold constants, zero rows, then slice every member. In place on the layers."""
    gm = plan.analysis.traced.gm
    for fqn, (dim, idx, carried) in folds.items():
        remove.fold_constants_(gm.get_submodule(fqn), dim, idx, carried)
    for use, channels in _producer_uses(plan):
        zero = plan.physical[use.key] & ~plan.own[use.fqn][channels]
        if zero.any():
            remove.zero_outputs_(gm.get_submodule(use.fqn), use.dim, zero.nonzero().flatten())
            report["zeroed"][use.fqn] = int(zero.sum())
    done = set()
    for use in plan.analysis.uses:
        phys = plan.physical.get(use.key)
        ident = (use.fqn, use.kind, use.dim)
        if ident in done or phys is None or phys.all():
            continue
        done.add(ident)
        _slice_member(plan, use, phys.nonzero().flatten(), model)
        report["layers"].setdefault(use.fqn, {})[use.kind] = [len(phys), int(phys.sum())]


def _slice_member(plan: Plan, use, keep_idx: torch.Tensor, model: nn.Module) -> None:
    gm = plan.analysis.traced.gm
    if use.kind == "channelwise" and not _is_module(gm, use.fqn):
        # a parameter used in an element-wise op; fx's GraphModule may hold it on its own
        # attribute owner, so slice it both there and in the model (once per owner)
        prefix, _, name = use.fqn.rpartition(".")
        owners = {id(o): o for o in (_owner(gm, prefix), _owner(model, prefix)) if o is not None}
        for owner in owners.values():
            if isinstance(getattr(owner, name, None), torch.Tensor):
                remove.slice_tensor_(owner, name, use.dim, keep_idx)
        return
    layer = gm.get_submodule(use.fqn)
    if use.kind == "producer":
        remove.slice_outputs_(layer, use.dim, keep_idx)
    elif use.kind == "consumer":
        remove.slice_inputs_(layer, use.dim, keep_idx)
    elif use.kind == "grouped":
        remove.slice_grouped_(layer, keep_idx)
    else:
        remove.slice_channelwise_(layer, keep_idx)


def _owner(root: nn.Module, prefix: str) -> nn.Module | None:
    try:
        return root.get_submodule(prefix) if prefix else root
    except AttributeError:
        return None


def _is_module(root: nn.Module, fqn: str) -> bool:
    return _owner(root, fqn) is not None


def _report(plan: Plan, folds: dict) -> dict:
    groups = [
        {
            "id": g.id,
            "size": g.size,
            "kept": int(plan.group_keep[g.id].sum()),
            "residual": g.residual,
        }
        for g in plan.analysis.groups
        if not plan.group_keep[g.id].all()
    ]
    return {
        "residual": plan.residual,
        "trace": plan.analysis.traced.source,
        "groups": groups,
        "layers": {},
        "zeroed": {},
        "folded": {fqn: len(idx) for fqn, (_, idx, _) in folds.items()},
    }


def _count_joins(model: nn.Module) -> int:
    return sum(isinstance(m, ResidualJoin) for m in model.modules())


@torch.no_grad()
def check_same(model: nn.Module, inputs: tuple, reference: list[torch.Tensor]) -> None:
    """The slimmed model runs and matches the masked model's outputs on the example inputs."""
    with eval_mode(model):
        got = torch.utils._pytree.tree_leaves(model(*inputs))
    got = [t for t in got if isinstance(t, torch.Tensor)]
    for out, ref in zip(got, reference, strict=True):
        scale = 1.0 + float(ref.abs().max()) if ref.numel() else 1.0
        if out.shape != ref.shape or float((out - ref).abs().max()) > 1e-4 * scale:
            raise CompressorError(
                "internal error: the slimmed model differs from the masked model; please report"
            )
