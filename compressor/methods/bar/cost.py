"""BAR's share of the cost engine: the per-channel weights of L_S and the fitter's units.

The engine itself (`compressor.surgery.cost.CostModel` predicts a decision's exact cost,
`compressor.surgery.fit.fit_budget` meets the budget) is shared with every structured
method; what is BAR's own is how much each gate's channel weighs in L_S (the paper's A_l)
and how its gate units become the fitter's units.
"""

from __future__ import annotations

import math

import torch

from compressor.methods.bar.gates import GateUnit
from compressor.surgery.cost import CostModel
from compressor.surgery.fit import FitUnit
from compressor.surgery.pricing import Pricer


def channel_weights(costs: CostModel, unit: GateUnit, metric: str, own_units: int) -> torch.Tensor:
    """Per unit channel, the dense cost it carries: the A_l of L_S.

    Volume: the output area of every producer the channel belongs to. FLOPs: the MACs of
    one output channel of each producer plus the MACs its consumers spend on it; on a
    mixed stream a channel leaves the consumers only when every producer drops it, so
    each of the stream's `own_units` producers carries an equal share of that part.
    """
    weight = torch.zeros(unit.size)
    for target in unit.targets:
        layer = costs.layers[target.member.fqn]
        per_channel = layer.area * (1 if metric == "volume" else math.prod(layer.shape[1:]))
        weight.index_add_(
            0, target.positions, torch.full((len(target.positions),), float(per_channel))
        )
    if metric == "flops":
        share = _consumer_share(costs, unit)
        weight += share if unit.own is None else share[unit.own.index] / max(1, own_units)
    return weight


def unit_weights(pricer: Pricer, costs: CostModel, unit: GateUnit, own_units: int) -> torch.Tensor:
    """A_l of L_S for `unit`: its channels' counted weights at the unit's own price per
    counted unit (`Pricer.rate` of its probe cut: 1 unless latency)."""
    weight = channel_weights(costs, unit, pricer.counted(), own_units)
    return pricer.rate(probe_cut(unit)) * weight


def probe_cut(unit: GateUnit) -> dict:
    """The keep entry of `unit` with half its free channels: the cut a latency price is
    measured on (`Pricer.rate`)."""
    free = (~unit.fixed).nonzero().flatten()
    mask = unit.fixed.clone()
    mask[free[: (len(free) + 1) // 2]] = True
    return unit.keep_entry(mask)


def _consumer_share(costs: CostModel, unit: GateUnit) -> torch.Tensor:
    """Per group channel, the MACs the consumers spend on one of its input slices."""
    share = torch.zeros(unit.group.size)
    for member in unit.group.consumers:
        layer = costs.layers.get(member.fqn)
        if layer is not None and not layer.grouped:
            per_slice = layer.area * math.prod(layer.shape[2:]) * layer.out_channels
            share.index_add_(0, member.index, torch.full((len(member.index),), float(per_slice)))
    return share


def keep_dict(units: list[GateUnit], masks: list[torch.Tensor]) -> dict:
    """The `slim_` keep dict of per-unit masks."""
    keep: dict = {}
    for unit, mask in zip(units, masks, strict=True):
        keep |= unit.keep_entry(mask)
    return keep


def fit_units(units: list[GateUnit], scores: list[torch.Tensor]) -> list[FitUnit]:
    """The fitter's units: each gate unit's keep-dict key, channel scores and fixed channels."""
    return [
        FitUnit(next(iter(unit.keep_entry(unit.fixed))), score.detach(), unit.fixed)
        for unit, score in zip(units, scores, strict=True)
    ]


def at_least_one_(units: list[GateUnit], masks: list[torch.Tensor], scores: list) -> None:
    """Every unit keeps its best-scored channel when it would keep none. In place."""
    for unit, mask, score in zip(units, masks, scores):
        mask |= unit.fixed
        if not mask.any():
            mask[int(score.argmax())] = True
