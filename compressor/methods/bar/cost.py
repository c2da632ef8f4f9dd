"""Exact activation volume and FLOPs of a channel decision, and the step that meets a budget.

`CostModel` predicts what `compressor.stats.measure` will count on the slimmed network for
any keep dict, without slimming: per Conv/Linear layer, volume = live output channels x its
output area, MACs = live outputs x live inputs (per group) x its dense MACs per channel pair.
Which channels are live at each layer's input comes from the surgery plan that `slim_`
itself uses, so mixed residual streams (a consumer reads the union of the channels its
stream's producers keep) are counted exactly as they will be built.

`meet_budget` is the final step shared by BAR and magnitude channel pruning: it removes the
lowest-scored live channels until the cost is within the budget, then restores the
highest-scored removed ones that still fit, so the result lands in [low, target].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import TargetNotReachedError
from compressor.masks import PRUNABLE_TYPES
from compressor.methods.bar.gates import GateUnit
from compressor.stats import measure
from compressor.surgery.graph import PRODUCING, analyse
from compressor.surgery.plan import make_plan

# After a bisection, at most this many single-channel trials refine a decision.
MAX_TRIALS = 400
MEMO_SIZE = 4096  # cached decisions (a few KB each)


@dataclass(frozen=True)
class LayerCost:
    """Dense per-sample costs of one Conv/Linear layer."""

    fqn: str
    out_channels: int
    in_width: int  # weight.shape[1]: inputs per group (in_features for Linear)
    grouped: bool  # groups > 1: inputs follow outputs group by group
    area: float  # output elements per output channel (H*W; tokens for a Linear)
    mac_unit: float  # MACs per (output channel, input channel of its group) pair


class CostModel:
    """Volume and FLOPs (MACs) of `model` slimmed with any keep dict, per sample."""

    def __init__(self, model: nn.Module, example_inputs: tuple, residual: str):
        stats = measure(model, example_inputs)
        self.analysis = analyse(model, example_inputs)
        self.residual = residual
        self.layers: dict[str, LayerCost] = {}
        for row in stats.layers:
            module = model.get_submodule(row.fqn)
            if isinstance(module, PRUNABLE_TYPES) and row.channels:
                in_width = module.weight.shape[1]
                self.layers[row.fqn] = LayerCost(
                    row.fqn,
                    row.channels,
                    in_width,
                    getattr(module, "groups", 1) > 1,
                    row.volume / row.channels,
                    row.flops / (row.channels * in_width),
                )
        self.dense_volume, self.dense_flops = float(stats.volume), float(stats.flops)
        self._memo: dict[tuple, tuple[float, float]] = {}

    def live(self, keep: dict, residual: str | None = None) -> dict[str, tuple[int, int]]:
        """{layer: (live output channels, live inputs per group)} once slimmed with `keep`.

        `residual` overrides the model's mode: "tied" with per-layer keeps realises the same
        decision with every stream keeping the union of its producers' channels.
        """
        plan = make_plan(self.analysis, keep, residual or self.residual)
        out = {fqn: [c.out_channels, c.in_width] for fqn, c in self.layers.items()}
        for use in self.analysis.uses:
            if use.fqn not in out or use.key not in plan.physical:
                continue
            count = int(plan.physical[use.key].sum())
            if use.kind in PRODUCING:
                out[use.fqn][0] = count
            elif use.kind == "consumer" and not self.layers[use.fqn].grouped:
                out[use.fqn][1] = count
        return {fqn: (o, i) for fqn, (o, i) in out.items()}

    def cost(self, keep: dict, residual: str | None = None) -> tuple[float, float]:
        """(volume, MACs) of the slimmed network, as `measure` counts them.

        Memoised: during training the decision changes only now and then, and a plan costs
        milliseconds per call on a ResNet-56.
        """
        key = tuple(sorted((str(k), torch.as_tensor(v).numpy().tobytes()) for k, v in keep.items()))
        key += (residual,)
        if key not in self._memo:
            if len(self._memo) > MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = self._cost(keep, residual)
        return self._memo[key]

    def _cost(self, keep: dict, residual: str | None) -> tuple[float, float]:
        volume = flops = 0.0
        for fqn, (outs, ins) in self.live(keep, residual).items():
            layer = self.layers[fqn]
            volume += outs * layer.area
            flops += outs * ins * layer.mac_unit
        return volume, flops

    def dense(self, metric: str) -> float:
        return self.dense_volume if metric == "volume" else self.dense_flops

    def channel_weights(self, unit: GateUnit, metric: str, own_units: int) -> torch.Tensor:
        """Per unit channel, the dense cost it carries: the A_l of L_S.

        Volume: the output area of every producer the channel belongs to. FLOPs: the MACs of
        one output channel of each producer plus the MACs its consumers spend on it; on a
        mixed stream a channel leaves the consumers only when every producer drops it, so
        each of the stream's `own_units` producers carries an equal share of that part.
        """
        weight = torch.zeros(unit.size)
        for target in unit.targets:
            layer = self.layers[target.member.fqn]
            per_channel = layer.area if metric == "volume" else layer.mac_unit * layer.in_width
            weight.index_add_(
                0, target.positions, torch.full((len(target.positions),), per_channel)
            )
        if metric == "flops":
            share = _consumer_share(self, unit)
            weight += share if unit.own is None else share[unit.own.index] / max(1, own_units)
        return weight


def _consumer_share(model: CostModel, unit: GateUnit) -> torch.Tensor:
    share = torch.zeros(unit.group.size)
    for member in unit.group.consumers:
        layer = model.layers.get(member.fqn)
        if layer is not None and not layer.grouped:
            per_slice = layer.mac_unit * layer.out_channels
            share.index_add_(0, member.index, torch.full((len(member.index),), per_slice))
    return share


def keep_dict(units: list[GateUnit], masks: list[torch.Tensor]) -> dict:
    """The `slim_` keep dict of per-unit masks."""
    keep: dict = {}
    for unit, mask in zip(units, masks, strict=True):
        keep |= unit.keep_entry(mask)
    return keep


def at_least_one_(units: list[GateUnit], masks: list[torch.Tensor], scores: list) -> None:
    """Every unit keeps its best-scored channel when it would keep none. In place."""
    for unit, mask, score in zip(units, masks, scores):
        mask |= unit.fixed
        if not mask.any():
            mask[int(score.argmax())] = True


@dataclass
class Adjustment:
    """What `meet_budget` changed."""

    before: float
    after: float
    removed: int = 0
    restored: int = 0


def meet_budget(
    units: list[GateUnit],
    masks: list[torch.Tensor],
    scores: list[torch.Tensor],
    cost: Callable[[list[torch.Tensor]], float],
    target: float,
    low: float,
) -> tuple[list[torch.Tensor], Adjustment]:
    """Masks whose cost lies in [low, target]: lowest scores out first, highest back first.

    Args:
        units: The gate units the masks belong to.
        masks: Bool mask per unit (the learned decision); not modified.
        scores: Per unit, a score per channel (higher: more worth keeping).
        cost: The exact cost of a list of masks.
        target: The budget (upper bound).
        low: The lower end of the accepted window.

    Raises:
        TargetNotReachedError: Even the smallest network (one channel per unit) exceeds target.
    """
    masks = [m.clone() for m in masks]
    at_least_one_(units, masks, scores)
    info = Adjustment(before=cost(masks), after=0.0)
    flat_scores = torch.cat([s.detach().float() for s in scores])
    if info.before > target:
        info.removed = _remove(units, masks, flat_scores, cost, target, low)
    if cost(masks) < low:
        info.restored = _restore(units, masks, flat_scores, cost, target, low)
    info.after = cost(masks)
    return masks, info


def _locate(units: list[GateUnit]) -> list[tuple[int, int]]:
    return [(u, c) for u, unit in enumerate(units) for c in range(unit.size)]


def _set(masks, where, picks, value: bool) -> None:
    for i in picks:
        u, c = where[i]
        masks[u][c] = value


def _remove(units, masks, flat_scores, cost, target, low) -> int:
    """Removes the lowest-scored removable channels until the cost fits the budget.

    The shortest prefix (in score order) that fits is found by bisection. When its last
    channel takes the cost below `low` (a coarse channel, e.g. of a large feature map), that
    channel stays and the next ones in score order are removed instead where each keeps
    the cost at or above `low`, until it fits.
    """
    where = _locate(units)
    live = torch.cat(masks) & ~torch.cat([u.fixed for u in units])
    protected = _best_live(units, masks, flat_scores)
    candidates = [i for i in flat_scores.argsort().tolist() if live[i] and i not in protected]

    def cost_without(picks) -> float:
        trial = [m.clone() for m in masks]
        _set(trial, where, picks, False)
        return cost(trial)

    if cost_without(candidates) > target:
        raise TargetNotReachedError(
            f"the budget ({target:.6g}) is below the smallest network that can be built (every "
            "layer keeps one channel); ask for a smaller reduction or exclude fewer layers"
        )
    lo, hi = 0, len(candidates)  # the smallest k whose prefix fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost_without(candidates[:mid]) <= target else (mid + 1, hi)
    if hi == 0 or cost_without(candidates[:hi]) >= low:
        _set(masks, where, candidates[:hi], False)
        return hi
    picks = _fill_from_above(candidates[: hi - 1], candidates[hi:], cost_without, target, low)
    picks = picks if picks is not None else candidates[:hi]
    _set(masks, where, picks, False)
    return len(picks)


def _fill_from_above(picks, rest, cost_without, target, low) -> list[int] | None:
    """`picks` plus further channels of `rest` that keep the cost >= low, until it fits."""
    picks = list(picks)
    for i in rest[:MAX_TRIALS]:
        trial = cost_without(picks + [i])
        if trial >= low:
            picks.append(i)
            if trial <= target:
                return picks
    return None


def _best_live(units, masks, flat_scores) -> set[int]:
    """Per unit without fixed channels, its best-scored live channel (keeps >= 1 per unit)."""
    best, offset = set(), 0
    for unit, mask in zip(units, masks):
        scores = flat_scores[offset : offset + unit.size].masked_fill(~mask, float("-inf"))
        if not unit.fixed.any():
            best.add(offset + int(scores.argmax()))
        offset += unit.size
    return best


def _restore(units, masks, flat_scores, cost, target, low) -> int:
    """Restores the longest prefix of the best-scored removed channels that fits, then any
    single channel that still fits, best first, until the cost reaches `low`."""
    where = _locate(units)
    dead = ~torch.cat(masks)
    candidates = [i for i in flat_scores.argsort(descending=True).tolist() if dead[i]]

    def cost_with(picks) -> float:
        trial = [m.clone() for m in masks]
        _set(trial, where, picks, True)
        return cost(trial)

    lo, hi = 0, len(candidates)  # the largest k whose prefix fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost_with(candidates[:mid]) <= target else (lo, mid - 1)
    picks = candidates[:lo]
    current = cost_with(picks)
    for i in candidates[lo + 1 : lo + 1 + MAX_TRIALS]:
        if current >= low:
            break
        trial = cost_with(picks + [i])
        if trial <= target:
            picks, current = picks + [i], trial
    _set(masks, where, picks, True)
    return len(picks)
