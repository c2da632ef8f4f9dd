"""Which residual streams can be mixed: a trial slim per stream, before a method commits.

Mixed mode lets every producer of a residual stream keep its own channels, which only an
add can reconcile exactly. A stream that is also joined by another op (a multiply, a
maximum), or whose removed channels reach an add as something other than a constant, cannot
be slimmed that way. `unmixable_streams` finds those streams up front by slimming a copy of
the model with staggered per-producer masks (producers alternately drop every other
removable channel, so every join sees channels that one operand keeps and the other drops),
zeroed after their norms as the methods zero them; a method then ties just those streams.
One trial covers all streams; only when it fails does each stream get its own.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError, InputError
from compressor.lift import clone_model
from compressor.surgery.groups import ChannelGroup
from compressor.surgery.plan import NotExactError
from compressor.surgery.slim import mask_, slim_


def unmixable_streams(
    model: nn.Module, groups: list[ChannelGroup], example_inputs: tuple, skip=lambda fqn: False
) -> dict[int, str]:
    """{group id: why} for the residual streams that mixed mode cannot slim exactly.

    Args:
        model: The model (not modified; each trial slims a deep copy).
        groups: Its channel groups (`channel_groups(model, example_inputs)`).
        example_inputs: A tuple of inputs the model runs on.
        skip: fqn -> True for producers the method leaves alone (never given an own mask).
    """
    trials = {g.id: keep for g in groups if (keep := _staggered(g, skip)) is not None}
    merged = {fqn: mask for keep in trials.values() for fqn, mask in keep.items()}
    if not trials or _refusal(model, merged, example_inputs) is None:
        return {}  # the usual case: one trial clears every stream
    refused = {}
    for group_id, keep in trials.items():
        if (why := _refusal(model, keep, example_inputs)) is not None:
            refused[group_id] = why
    return refused


def _refusal(model: nn.Module, keep: dict, example_inputs: tuple) -> str | None:
    """Why a mixed slim of a copy with `keep` is not exact, or None when it is."""
    trial = clone_model(model)
    try:
        mask_(trial, keep, example_inputs, residual="mixed", norms=True)
        slim_(trial, keep, example_inputs, residual="mixed")
    except NotExactError as exc:
        return str(exc)
    except InputError:
        return None  # the trial masks themselves are unusable: let the real run decide
    except CompressorError as exc:
        return str(exc)
    return None


def _staggered(group: ChannelGroup, skip) -> dict[str, torch.Tensor] | None:
    """Per-producer masks where producer i keeps the removable channels of parity i % 2."""
    if not (group.residual and group.prunable) or group.of_kind("grouped"):
        return None
    producers = [m for m in group.of_kind("producer") if not skip(m.fqn)]
    removable = (~group.fixed).nonzero().flatten()
    if len(producers) < 2 or len(removable) < 2:
        return None
    keep = {}
    for i, member in enumerate(producers):
        channels = group.fixed.clone()
        channels[removable[i % 2 :: 2]] = True
        keep[member.fqn] = channels[member.index]
        if not keep[member.fqn].any():
            return None
    return keep


def stream_name(group: ChannelGroup) -> str:
    """'group N (a, b, c)': a stream by its id and producing layers, for reports."""
    names = [m.fqn for m in group.producers]
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"group {group.id} ({shown})"


def check_exact(
    model: nn.Module, groups: list[ChannelGroup], example_inputs: tuple, skip=lambda fqn: False
) -> None:
    """Raise now, not after training, when removing channels could never slim exactly.

    Slims a copy with every other removable channel of each prunable group removed (tied,
    zeroed after the norms), the way the structured methods remove them.

    Raises:
        NotExactError: (an InputError) naming the layer or node and the reason.
    """
    keep = {}
    for group in groups:
        removable = (~group.fixed).nonzero().flatten()
        if group.prunable and len(removable) >= 2 and not any(skip(m.fqn) for m in group.producers):
            keep[group.id] = group.fixed.clone().index_fill_(0, removable[::2], True)
    if keep:
        trial = clone_model(model)
        mask_(trial, keep, example_inputs, norms=True)
        slim_(trial, keep, example_inputs)
