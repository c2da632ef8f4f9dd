"""The cost engine's fitter: channels out or back in, by score, until the cost meets the budget.

Every structured method decides with scores (BAR's log alpha, filter norms, GSS ranks) and
this one step turns them into keep masks whose cost lies in [low, target]. A unit (a channel
group, or one producer's own channels on a mixed stream) always keeps its fixed channels
and its best-scored ones, so its state is one count; with `round_to` N the counts are the
multiples of N (and the unit's full size), so every slimmed layer stays aligned. A *step*
moves one unit to its next count down (removal) or up (restore); a step is worth the best
score among the channels it moves.

1. Removal: the shortest prefix of steps, least worth first, that fits the target
   (bisection; the cost only falls as channels go). When its last step is coarse and
   undershoots `low`, finer steps after it are taken instead.
2. Restore: the longest prefix of steps, most worth first, that still fits, then single
   steps that fit until the cost reaches `low`.
3. Trade: still below `low` (every step back overshoots: coarse channels, e.g. of a large
   feature map, or aligned steps), one unit steps back up (one to TRADE_STEPS steps) and
   the removal runs again on the other units.

A `floor` keeps every unit at that share of its channels or more (rounded up to an allowed
count), so no layer collapses to a few channels while others stay wide; when even the
floored smallest network costs more than the target, the floor halves (FLOOR_TRIES times),
then goes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compressor.errors import BelowSmallestNetworkError, InputError

MAX_TRIALS = 400  # single-step trials after a bisection
MAX_TRADES = 32  # units tried a step up in the trade phase
TRADE_STEPS = 4  # steps up one unit may take there (aligned steps are coarse)
TRADE_TRIALS = 32  # single-step trials after each trade's bisection
FLOOR_TRIES = 2  # halvings of a floor the budget cannot afford before it is dropped


@dataclass(frozen=True)
class FitUnit:
    """Channels one keep-dict entry decides.

    Attributes:
        key: The entry's key in a `slim_` keep dict: a group id or a producing layer's path.
        scores: Float [size]: higher is more worth keeping.
        fixed: Bool [size]: channels that are never removed.
    """

    key: int | str
    scores: torch.Tensor
    fixed: torch.Tensor


@dataclass
class Fit:
    """The fitted masks and what the fitter changed (channel counts against the start)."""

    masks: list[torch.Tensor]
    before: float
    after: float
    removed: int = 0
    restored: int = 0
    miss: str | None = None  # why the cost stayed below `low`, when it did
    floor: float = 0.0  # the share of each unit's channels every unit kept at least


class _Ladder:
    """One unit's channels in keeping order (fixed first, then by score) and allowed counts."""

    def __init__(self, unit: FitUnit, round_to: int, floor: float = 0.0):
        scores = unit.scores.detach().float().masked_fill(unit.fixed, float("inf"))
        self.order = torch.sort(scores, descending=True, stable=True).indices
        self.ranked = scores[self.order]
        size, fixed = len(scores), int(unit.fixed.sum())
        least = math.ceil(floor * size - 1e-9)  # the floor's count (1e-9: 0.375 * 64 is 24)
        self.counts = aligned_counts(size, max(fixed, least), round_to)

    def mask(self, level: int) -> torch.Tensor:
        mask = torch.zeros(len(self.order), dtype=torch.bool)
        mask[self.order[: self.counts[level]]] = True
        return mask

    def level_of(self, count: int) -> int:
        """The lowest level keeping at least `count` channels."""
        return min(bisect.bisect_left(self.counts, count), len(self.counts) - 1)


def aligned_counts(size: int, fixed: int, round_to: int = 1) -> list[int]:
    """The kept counts a unit may take, ascending: multiples of `round_to` from its floor
    (one channel, or the `fixed` count it keeps at least) up, and its full size."""
    floor = max(1, fixed)
    return [k for k in range(round_to, size, round_to) if k >= floor] + [size]


# The floor structured methods keep by default (`min_keep` None) under the budget metrics
# they name (`floor_of`): priced by the latency table their decisions collapsed whole stages
# to 8 channels, and BAR's tied ones did under FLOPs too. Top-1 without -> with, 3 epochs,
# bench.latency_floor. Measured 2x at batch 1, tied: BAR ResNet-20 76.45 -> 83.75 (floors
# 0.25 / 0.5: 81.65 / 83.43), ResNet-56 81.62 -> 83.20, MobileNetV2 82.13 -> 83.85;
# structured GSS 80.10 -> 81.49, 82.20 -> 82.20, 67.99 -> 77.31. 4x FLOPs: BAR tied
# 79.93 -> 81.85, 81.41 -> 82.62, 82.67 -> 83.84, mixed 84.14 / 82.91 the same, 83.26 ->
# 83.90; GSS 80.61 -> 81.34 on ResNet-20 but 81.46 -> 81.09 and 78.16 -> 77.24 on
# ResNet-56 / MobileNetV2, so GSS keeps none under FLOPs. Volume (the BAR paper's own
# metric) is not measured and keeps none.
DEFAULT_FLOOR = 0.375


def check_min_keep(value) -> float | None:
    """`min_keep` as a share in [0, 1) (None: the metric's default), else InputError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(
            f"min_keep {value!r}: give the share of each layer's channels every layer keeps "
            "at least, from 0 (no floor) to below 1, e.g. --set min_keep=0.25"
        )
    return float(value)


def floor_of(min_keep: float | None, metric: str, floored: tuple[str, ...]) -> float:
    """The fitter's floor: `min_keep` when given, else DEFAULT_FLOOR under the budget metrics
    `floored` names (the method's), else 0."""
    if min_keep is not None:
        return min_keep
    return DEFAULT_FLOOR if metric in floored else 0.0


def check_round_to(round_to) -> int | None:
    """`round_to` as an int >= 1 (None: the metric's default), else InputError naming it."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(
            f"round_to {round_to!r}: give a whole number of channels >= 1 (1 = no alignment), "
            "e.g. --round-to 8"
        )
    return round_to


def fit_budget(
    units: list[FitUnit],
    cost: Callable[[dict], float],
    target: float,
    low: float,
    start: list[torch.Tensor] | None = None,
    round_to: int = 1,
    floor: float = 0.0,
) -> Fit:
    """Keep masks per unit whose cost lies in [low, target] (see the module docstring).

    Args:
        units: The units the masks decide.
        cost: The exact cost of a keep dict {unit.key: mask} (e.g. `CostModel.cost`).
        target: The budget (an upper bound).
        low: The lower end of the accepted window.
        start: A decision to start from (a learned one), kept as it is when it lies in
            the window and is aligned; default: every channel kept.
        round_to: Kept counts are multiples of this, or a unit's full size.
        floor: Every unit keeps at least this share of its channels while the budget
            allows (halved, then dropped, when it does not: `Fit.floor` is the one kept).

    Raises:
        BelowSmallestNetworkError: Even the smallest network (each unit at one channel, or
            its fewest aligned ones) costs more than `target`.
    """
    round_to = check_round_to(round_to) or 1
    shares = [floor / 2**i for i in range(FLOOR_TRIES + 1)] if floor > 0 else []
    for share in [*shares, 0.0]:
        search = _Search(units, cost, round_to, share)
        if share == 0.0 or search.cost([0] * len(units)) <= target:
            break
    fit = _fitted(search, start, target, low)
    fit.floor = share
    return fit


def _fitted(search: _Search, start, target: float, low: float) -> Fit:
    masks = search.start_masks(start)
    before = search.cost_of_masks(masks)
    if low <= before <= target and search.aligned(masks):
        return Fit(masks, before, before)
    levels = search.levels_of(masks)
    if search.cost(levels) > target:
        levels = search.remove(levels, target, low)
    if search.cost(levels) < low:
        levels = search.restore(levels, target, low)
    if search.cost(levels) < low:
        levels = search.trade(levels, target, low)
    return search.result(masks, levels, before, low)


class _Search:
    """The fitter's state: ladders per unit and the cost of a vector of levels."""

    def __init__(self, units: list[FitUnit], cost: Callable[[dict], float], round_to: int,
                 floor: float = 0.0):  # fmt: skip
        self.units, self._cost, self.round_to = units, cost, round_to
        self.ladders = [_Ladder(u, round_to, floor) for u in units]

    def start_masks(self, start: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if start is None:
            return [torch.ones(len(u.fixed), dtype=torch.bool) for u in self.units]
        masks = []
        for unit, mask in zip(self.units, start, strict=True):
            mask = mask.clone() | unit.fixed
            if not mask.any():
                mask[int(unit.scores.argmax())] = True
            masks.append(mask)
        return masks

    def aligned(self, masks: list[torch.Tensor]) -> bool:
        return all(int(m.sum()) in lad.counts for m, lad in zip(masks, self.ladders))

    def levels_of(self, masks: list[torch.Tensor]) -> list[int]:
        return [lad.level_of(int(m.sum())) for m, lad in zip(masks, self.ladders)]

    def masks_of(self, levels: list[int]) -> list[torch.Tensor]:
        return [lad.mask(level) for lad, level in zip(self.ladders, levels)]

    def cost_of_masks(self, masks: list[torch.Tensor]) -> float:
        return self._cost({u.key: m for u, m in zip(self.units, masks)})

    def cost(self, levels: list[int]) -> float:
        return self.cost_of_masks(self.masks_of(levels))

    def removal_steps(self, levels: list[int], frozen: int | None = None) -> list[int]:
        """Unit indices, one per step down, least worth first."""
        steps = []
        for u, (lad, level) in enumerate(zip(self.ladders, levels)):
            if u != frozen:
                steps += [
                    (float(lad.ranked[lad.counts[i - 1]]), u, -i) for i in range(level, 0, -1)
                ]
        return [u for _, u, _ in sorted(steps)]

    def restore_steps(self, levels: list[int]) -> list[int]:
        """Unit indices, one per step up, most worth first."""
        steps = []
        for u, (lad, level) in enumerate(zip(self.ladders, levels)):
            steps += [
                (-float(lad.ranked[lad.counts[i]]), u, i) for i in range(level, len(lad.counts) - 1)
            ]
        return [u for _, u, _ in sorted(steps)]

    @staticmethod
    def moved(levels: list[int], steps: list[int], sign: int) -> list[int]:
        out = list(levels)
        for u in steps:
            out[u] += sign
        return out

    def remove(self, levels, target, low, frozen: int | None = None, trials=MAX_TRIALS):
        """Levels after the shortest removal prefix that fits (see the module docstring)."""
        steps = self.removal_steps(levels, frozen)
        smallest = self.cost(self.moved(levels, steps, -1))
        if smallest > target:
            if frozen is not None:
                return None
            raise BelowSmallestNetworkError(
                f"the budget ({target:.6g}) is below the smallest network that can be built "
                f"(every layer keeps {'one channel' if self.round_to == 1 else 'its fewest aligned channels'}); "
                "ask for a smaller reduction or exclude fewer layers",
                smallest / target,
            )
        lo, hi = 0, len(steps)
        while lo < hi:
            mid = (lo + hi) // 2
            fits = self.cost(self.moved(levels, steps[:mid], -1)) <= target
            lo, hi = (lo, mid) if fits else (mid + 1, hi)
        taken = steps[:hi]
        if hi == 0 or self.cost(self.moved(levels, taken, -1)) >= low:
            return self.moved(levels, taken, -1)
        filled = self._fill(levels, steps[: hi - 1], steps[hi - 1 :][:trials], target, low)
        return filled if filled is not None else self.moved(levels, taken, -1)

    def _fill(self, levels, base, rest, target, low) -> list[int] | None:
        """`base` plus later steps that keep the cost >= low, until it fits."""
        picks, blocked = list(base), set()
        for u in rest:
            if u in blocked:
                continue  # a unit's later steps move better channels: not before this one
            trial = self.moved(levels, picks + [u], -1)
            value = self.cost(trial)
            if value < low:
                blocked.add(u)
                continue
            picks.append(u)
            if value <= target:
                return trial
        return None

    def restore(self, levels, target, low) -> list[int]:
        """Levels after the longest restore prefix that fits, then single steps that fit."""
        steps = self.restore_steps(levels)
        lo, hi = 0, len(steps)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self.cost(self.moved(levels, steps[:mid], +1)) <= target
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        current, blocked = self.moved(levels, steps[:lo], +1), set()
        for u in steps[lo:][:MAX_TRIALS]:
            if self.cost(current) >= low:
                break
            if u in blocked:
                continue
            trial = self.moved(current, [u], +1)
            if self.cost(trial) <= target:
                current = trial
            else:
                blocked.add(u)
        return current

    def trade(self, levels, target, low) -> list[int]:
        """One unit up by 1 to TRADE_STEPS steps, the others down again to fit: the first
        landing in the window, else the best below it."""
        best, best_cost = levels, self.cost(levels)
        firsts = list(dict.fromkeys(self.restore_steps(levels)))[:MAX_TRADES]
        for steps in range(1, TRADE_STEPS + 1):
            for u in firsts:
                if levels[u] + steps >= len(self.ladders[u].counts):
                    continue
                up = self.moved(levels, [u] * steps, +1)
                down = self.remove(up, target, low, frozen=u, trials=TRADE_TRIALS)
                value = self.cost(down) if down is not None else float("inf")
                if best_cost < value <= target:
                    best, best_cost = down, value
                if low <= value <= target:
                    return best
        return best

    def result(self, start: list[torch.Tensor], levels: list[int], before, low) -> Fit:
        masks = self.masks_of(levels)
        after = self.cost_of_masks(masks)
        removed = sum(int((s & ~m).sum()) for s, m in zip(start, masks))
        restored = sum(int((m & ~s).sum()) for s, m in zip(start, masks))
        fit = Fit(masks, before, after, removed, restored)
        if after < low:
            fit.miss = self.why(levels, after, low)
        return fit

    def why(self, levels: list[int], after: float, low: float) -> str:
        """Why no decision landed in the window: the finest step back in overshoots."""
        steps = list(dict.fromkeys(self.restore_steps(levels)))
        jumps = [self.cost(self.moved(levels, [u], +1)) - after for u in steps[:MAX_TRADES]]
        finest = min(jumps) if jumps else 0.0
        aligned = f" of {self.round_to} channels (--round-to)" if self.round_to > 1 else ""
        return (
            f"the channel decision costs {after:.6g}, under the window's low end {low:.6g}: "
            f"the finest step{aligned} back adds {finest:.6g} and overshoots the budget, and no "
            "trade of one step back for finer ones lands in the window; ask for a slightly "
            "different budget" + (" or a smaller --round-to" if self.round_to > 1 else "")
        )
