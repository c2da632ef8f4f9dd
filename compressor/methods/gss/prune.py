"""Pruning after GSS training: which weights or channels go, by threshold or to a budget.

The official rule (the authors' prun_tune_V.py) zeroes every weight with
|w| < ratio * std(W_l) of its layer; a channel goes when its whole group (incoming rows and
outgoing columns) is below that threshold. Given a budget instead, weights are ranked by |w|
over the whole network and cut at exactly the budget's count; channels are ranked by their
norm relative to their layer's (`channel_scores`) and the cost engine's fitter
(`compressor.surgery.fit`) removes the least important until the exact FLOPs fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.masks import WeightMask, global_topk, weight_of
from compressor.methods.gss.reg import PRODUCING, NeuronGroup
from compressor.pattern_masks import select_masks
from compressor.surgery import ChannelGroup

if TYPE_CHECKING:
    from compressor.methods.base import Method

WEIGHT_KINDS = (*PRODUCING, "consumer")


def standardised(weight: torch.Tensor) -> torch.Tensor:
    """|w| / std(W) with the population std (np.std, as the authors' code)."""
    weight = weight.detach()
    return weight.abs() / weight.std(correction=0).clamp_min(torch.finfo(weight.dtype).tiny)


def element_masks(
    layers: dict[str, nn.Module],
    keep: float | None,
    ratio: float,
    rank: str = "magnitude",
    floors=None,
) -> dict[str, torch.Tensor]:
    """Masks keeping |w| >= ratio * std(W_l) (keep None), or the top `keep` fraction of scores.

    The ranked cut keeps round(keep * n) weights of the n prunable ones, so the sparsity is
    exact to one weight. It ranks |w| over the whole network (rank "magnitude"), or the
    threshold rule's own units |w| / std(W_l) (rank "std"), which can starve a small layer
    when the regularised training was short and the layers' distributions differ;
    `floors` (Method.floors: a callable giving per-layer minimum counts for a total) keeps
    every layer alive in the ranked cut.
    """
    if keep is None:
        return {fqn: standardised(weight_of(m)) >= ratio for fqn, m in layers.items()}
    scores = element_scores(layers, rank)
    count = round(keep * sum(s.numel() for s in scores.values()))
    return global_topk(scores, count, floors(count) if floors is not None else None)


def element_scores(layers: dict[str, nn.Module], rank: str) -> dict[str, torch.Tensor]:
    """What the ranked cut ranks: |w| ("magnitude") or |w| / std(W_l) ("std")."""
    scale = standardised if rank == "std" else lambda w: w.detach().abs()
    return {fqn: scale(weight_of(m)) for fqn, m in layers.items()}


def pattern_element_masks(method: Method, rank: str) -> dict[str, torch.Tensor]:
    """The ranked cut in units of `method.pattern`: the same scores, summed per block (ranked
    over all layers, whole blocks to the budget) or top-N per N:M group on the layers that
    lose the least score per pruned weight (compressor.pattern_masks)."""
    scores = element_scores(method.layers, rank)
    count = round(method.budget.keep * sum(s.numel() for s in scores.values()))
    return select_masks(method, scores, count, method.floors(count))


def channel_scores(
    model: nn.Module, groups: Sequence[NeuronGroup], rank: str = "magnitude"
) -> list[torch.Tensor]:
    """Per neuron group, per channel: how much its incoming and outgoing weights matter.

    rank "std": the largest |w| / std(W_l) (the threshold rule's units: a channel is below
    the threshold when this is below the ratio). "magnitude": the l2 norm of the channel's
    slice of each layer relative to that layer's mean channel norm, averaged over its layers.
    Relative, because raw norms differ by layer (a classifier's 1/sqrt(fan-in) scale would
    make every conv channel feeding it look unimportant and empty the conv layer).
    """
    return [_channel_score(model, ng.group, rank) for ng in groups]


def _channel_score(model: nn.Module, group: ChannelGroup, rank: str) -> torch.Tensor:
    total, count = torch.zeros(group.size), torch.zeros(group.size)
    for member in group.of_kind(*WEIGHT_KINDS):
        weight = model.get_submodule(member.fqn).weight.detach()
        per = standardised(weight) if rank == "std" else weight.pow(2)
        per = per.movedim(member.dim, 0).reshape(weight.shape[member.dim], -1)
        if rank == "std":
            total = total.scatter_reduce(0, member.index, per.amax(dim=1), "amax")
            continue
        norms = total.new_zeros(group.size).index_add(0, member.index, per.sum(dim=1)).sqrt()
        present = torch.bincount(member.index, minlength=group.size) > 0
        scale = norms[present].mean().clamp_min(torch.finfo(norms.dtype).tiny)
        total += torch.where(present, norms / scale, 0.0)
        count += present
    return total if rank == "std" else total / count.clamp_min(1)


def threshold_channels(
    groups: Sequence[NeuronGroup], scores: Sequence[torch.Tensor], ratio: float
) -> dict[int, torch.Tensor]:
    """Keep masks dropping channels whose whole group is below the threshold (>= 1 kept)."""
    keep = {}
    for ng, s in zip(groups, scores):
        mask = (s >= ratio) | ~ng.channels
        if not mask.any():
            mask[int(s.argmax())] = True
        keep[ng.group.id] = mask
    return keep


def channel_masks(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: dict[int, torch.Tensor]
) -> dict[tuple[str, str], torch.Tensor]:
    """Masks zeroing every tensor slice of the removed channels: {(module path, name): mask}.

    Producer rows and biases, consumer columns, and the affine parameters of the norms over
    the channels, so a removed channel is exactly zero everywhere (no BatchNorm shift leaks).
    """
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for group in groups:
        if group.id not in keep or bool(keep[group.id].all()):
            continue
        for member in group.members:
            names = _masked_tensors(member.kind)
            module = _module_or_none(model, member.fqn)
            for name in names if module is not None else ():
                tensor = getattr(module, name, None)
                if tensor is None:
                    continue
                # a bias runs along a producer's outputs; a norm's bias along its weight
                dim = member.dim if name == "weight" or member.kind == "norm" else 0
                positions = member.positions(keep[group.id])
                shape = [1] * tensor.dim()
                shape[dim] = -1
                mask = positions.view(shape).expand(tensor.shape)
                previous = masks.get((member.fqn, name))
                masks[(member.fqn, name)] = mask if previous is None else previous & mask
    return masks


def _masked_tensors(kind: str) -> tuple[str, ...]:
    if kind in PRODUCING or kind == "norm":
        return ("weight", "bias")
    return ("weight",) if kind == "consumer" else ()


def _module_or_none(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def install_masks_(model: nn.Module, masks: dict[tuple[str, str], torch.Tensor]) -> None:
    """Registers a fixed WeightMask parametrization per (module, tensor). In place."""
    for (fqn, name), mask in masks.items():
        module = model.get_submodule(fqn)
        parametrize.register_parametrization(module, name, WeightMask(mask.contiguous()))
