"""Removing model input features: the columns of a Linear layer that reads the model input.

Channel groups (`graph`) never remove model inputs: nothing inside the network produces them,
so there is no layer to slim upstream. A Linear that reads the input (directly or through a
flatten) can still drop input features: it keeps the weight columns of the features it reads
and gathers those features at its input. That is how the GSS authors' structured results are
counted (LeNet-300-100 760-39-60: 24 of 784 pixels unread), and how their regulariser treats
the input layer (its neurons have outgoing weights only).

    groups = with_input_features(model, channel_groups(model, x))  # + per-column groups
    select_inputs_(model, {"fc1": keep}, x)      # fc1 becomes a SelectedLinear

A `SelectedLinear` is an `nn.Linear` (statistics, masks and exports treat it as one) whose
`index` buffer names the input features it reads; in ONNX it is a Gather before the Gemm.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError, InputError
from compressor.masks import has_machinery
from compressor.surgery.groups import INPUT_REASON, ChannelGroup, Member
from compressor.surgery.layers import SelectedLinear
from compressor.surgery.slim import check_same
from compressor.surgery.trace import as_tuple, eval_mode

FEATURES_REASON = f"{INPUT_REASON} features of "  # + the Linear's path
__all__ = [
    "FEATURES_REASON",
    "SelectedLinear",
    "input_feature_layers",
    "select_inputs_",
    "with_input_features",
]


def with_input_features(model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """`groups` with each model-input group read by Linears split into per-column groups.

    A group qualifies when it carries the model input alone: no layer produces it and every
    member is a Linear's input (an input read by a conv or a norm stays as it is). Each such
    Linear gets a group of its own whose channels are its input features (columns), not
    fixed, ids after the last of `groups`: removing channel k means the Linear stops reading
    input feature k (`select_inputs_`). The other groups keep their ids, so they still name
    the same channels for `slim_`.
    """
    kept, features = [], []
    for group in groups:
        members = group.members
        if (
            INPUT_REASON not in group.reasons
            or group.producers
            or not members
            or not all(_reads_features(model, m) for m in members)
        ):
            kept.append(group)
            continue
        for member in members:
            size = model.get_submodule(member.fqn).in_features
            index = torch.arange(size)
            features.append(
                ChannelGroup(
                    len(groups) + len(features),
                    size,
                    (Member(member.fqn, "consumer", 1, index),),
                    torch.zeros(size, dtype=torch.bool),
                    (f"{FEATURES_REASON}{member.fqn}",),
                )
            )
    return kept + features


def input_feature_layers(groups: list[ChannelGroup]) -> dict[int, str]:
    """{group id: Linear path} of the groups `with_input_features` made."""
    return {
        g.id: g.members[0].fqn
        for g in groups
        if any(r.startswith(FEATURES_REASON) for r in g.reasons)
    }


def _reads_features(model: nn.Module, member: Member) -> bool:
    if member.kind != "consumer" or member.dim != 1:
        return False
    module = model.get_submodule(member.fqn)
    return type(module) is nn.Linear


def select_inputs_(
    model: nn.Module, keep: dict[str, torch.Tensor], example_inputs: torch.Tensor | tuple
) -> nn.Module:
    """Replaces each named Linear by a SelectedLinear reading only its kept input features.

    The result computes exactly what `model` computes with the dropped columns zeroed
    (checked on `example_inputs`; the model is left as it was if that check fails).

    Args:
        model: The network (no masks installed); changed in place.
        keep: {Linear path: bool mask over its input features (columns)}; >= 1 kept each.
        example_inputs: Inputs the model runs on, for the equality check.

    Returns:
        `model`.

    Raises:
        InputError: A path that is not a plain Linear, a mask of the wrong size, none kept.
        CompressorError: Masks are installed, or (an internal error) the result differs from
            the masked model.
    """
    if machinery := has_machinery(model):
        raise CompressorError(f"strip the masks first (compressor.masks.strip_): {machinery}")
    inputs = as_tuple(example_inputs)
    replacements = {}
    for fqn, mask in keep.items():
        layer = model.get_submodule(fqn)
        if type(layer) is not nn.Linear:
            raise InputError(f"select_inputs_: {fqn!r} is {type(layer).__name__}, not a Linear")
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (layer.in_features,) or not bool(mask.any()):
            raise InputError(
                f"select_inputs_: the mask for {fqn!r} needs {layer.in_features} entries, "
                "at least one True"
            )
        replacements[fqn] = _selected(layer, mask.nonzero().flatten())
    with eval_mode(model):
        reference = _masked_output(model, keep, inputs)
    originals = {fqn: model.get_submodule(fqn) for fqn in replacements}
    for fqn, new in replacements.items():
        _set(model, fqn, new)
    try:
        with torch.no_grad():
            check_same(model, inputs, reference)
    except CompressorError:
        for fqn, old in originals.items():
            _set(model, fqn, old)
        raise
    return model


def _selected(layer: nn.Linear, index: torch.Tensor) -> SelectedLinear:
    weight = layer.weight.detach()
    new = SelectedLinear(
        index,
        layer.out_features,
        bias=layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight.index_select(1, index))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
    new.train(layer.training)
    return new


@torch.no_grad()
def _masked_output(model: nn.Module, keep: dict[str, torch.Tensor], inputs: tuple):
    """The model's output with the dropped columns zeroed (weights restored afterwards)."""
    saved = {}
    for fqn, mask in keep.items():
        weight = model.get_submodule(fqn).weight
        saved[fqn] = weight.detach().clone()
        weight.mul_(torch.as_tensor(mask, dtype=weight.dtype, device=weight.device))
    try:
        outputs = torch.utils._pytree.tree_leaves(model(*inputs))
        return [t for t in outputs if isinstance(t, torch.Tensor)]
    finally:
        for fqn, weight in saved.items():
            model.get_submodule(fqn).weight.copy_(weight)


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
