"""From per-weight scores to masks that follow a pattern (N:M or RxC), at an exact count.

Every unstructured method ranks weights by its own score; with `--pattern` the same
scores go through `pattern_masks` instead of the per-weight top-k (masks.global_topk):

- ``RxC``: a block's score is the sum of its weights' scores (`patterns.group_sums`); the
  blocks of all layers are ranked together and taken best first while their element count
  fits the budget (`weighted_topk`). The kept count is exact in units of the pattern: at
  most `keep_total` weights, and fewer by less than one block's size (the first block that
  would pass the budget ends the ranking). The per-layer floors (masks.layer_floors) are
  met in blocks, spread over block rows.
- ``N:M``: N/M fixes a patterned layer's sparsity, so the budget chooses *which* layers
  carry the pattern: the eligible layers (column count a multiple of M) are ranked by the
  score their N:M mask removes per pruned weight, least first, and each is patterned while
  the total of zeros stays within the target; a layer that would pass it is skipped for
  the next. Then one more layer is patterned if that lands nearer the target (so asking
  for 0.5 with 2:4 patterns every eligible layer even when one small layer is not). Every
  other layer stays dense: the zeros are the target rounded to whole layers, and when
  that misses the 0.5 % tolerance the budget check names the sparsity whole layers reach
  (`nm_reach`, `pattern_hint`). N >= 1 kept per group keeps every row alive, so N:M needs
  no floor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from compressor.errors import InputError
from compressor.masks import global_topk, spread_picks, starved, weight_of
from compressor.patterns import (
    Pattern,
    eligible,
    expand_units,
    group_sums,
    holds,
    nm_mask,
    parse_pattern,
    unit_sizes,
)

if TYPE_CHECKING:
    from compressor.methods.base import Method


def pattern_masks(
    scores: dict[str, torch.Tensor],
    pattern: Pattern,
    keep_total: int,
    floors: dict[str, int] | None = None,
    tiebreak: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks (weight-shaped, bool) keeping about `keep_total` weights in units of `pattern`.

    Args:
        scores: per layer, a weight-shaped saliency (larger: more important).
        keep_total: weights to keep over all layers in `scores`.
        floors: per-layer minimum kept weights (RxC only; N:M keeps N of every M).
        tiebreak: a second weight-shaped score for equal unit scores (RxC only).
    """
    if pattern.kind == "nm":
        zeros_target = sum(s.numel() for s in scores.values()) - keep_total
        chosen = nm_layers(scores, pattern, zeros_target)
        return {
            f: nm_mask(s.detach(), pattern.a, pattern.b)
            if f in chosen
            else torch.ones_like(s, dtype=torch.bool)
            for f, s in scores.items()
        }
    return block_masks(scores, pattern, keep_total, floors, tiebreak)


def nm_zeros(shape: torch.Size, pattern: Pattern) -> int:
    """Zeros an N:M-patterned weight of `shape` has: (M - N) of every M."""
    return math.prod(shape) // pattern.b * (pattern.b - pattern.a)


def nm_losses(scores: dict[str, torch.Tensor], pattern: Pattern) -> dict[str, float]:
    """Per eligible layer, the score its N:M mask removes per pruned weight."""
    losses = {}
    for fqn, score in scores.items():
        if eligible(score.shape, pattern):
            score = score.detach().double()
            removed = score[~nm_mask(score, pattern.a, pattern.b)].sum()
            losses[fqn] = float(removed) / nm_zeros(score.shape, pattern)
    return losses


def nm_layers(scores: dict[str, torch.Tensor], pattern: Pattern, zeros_target: int) -> list[str]:
    """The layers to pattern: least loss per zero first, while the zeros fit the target;
    then the one unchosen layer that brings the zeros nearest the target, if any does."""
    losses = nm_losses(scores, pattern)
    chosen, zeros = [], 0
    for fqn in sorted(losses, key=losses.__getitem__):  # sorted() is stable: ties by position
        more = nm_zeros(scores[fqn].shape, pattern)
        if zeros + more <= zeros_target:
            chosen.append(fqn)
            zeros += more
    gap = {
        f: abs(zeros + nm_zeros(scores[f].shape, pattern) - zeros_target)
        for f in losses
        if f not in chosen
    }
    best = min(gap, key=lambda f: (gap[f], losses[f]), default=None)
    if best is not None and gap[best] < zeros_target - zeros:
        chosen.append(best)
    return chosen


def nm_reach(
    shapes: dict[str, torch.Size], pattern: Pattern, chosen: list[str]
) -> tuple[float, float]:
    """The sparsity the `chosen` layers give, and the most N:M gives (every eligible layer)."""
    total = sum(math.prod(s) for s in shapes.values())
    zeros = sum(nm_zeros(shapes[f], pattern) for f in chosen)
    most = sum(nm_zeros(s, pattern) for s in shapes.values() if eligible(s, pattern))
    return zeros / total, most / total


def block_masks(
    scores: dict[str, torch.Tensor],
    pattern: Pattern,
    keep_total: int,
    floors: dict[str, int] | None = None,
    tiebreak: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """RxC masks: whole blocks ranked by their summed score, at most `keep_total` weights."""
    units = {f: group_sums(s.detach().double(), pattern) for f, s in scores.items()}
    sizes = {f: unit_sizes(s.shape, pattern) for f, s in scores.items()}
    second = None
    if tiebreak is not None:
        second = {f: group_sums(t.detach().double(), pattern) for f, t in tiebreak.items()}
    unit_floors = None if floors is None else block_floors(floors, sizes, pattern)
    kept = weighted_topk(units, sizes, keep_total, unit_floors, second)
    return {f: expand_units(kept[f], scores[f].shape, pattern) for f in scores}


def block_floors(
    floors: dict[str, int], sizes: dict[str, torch.Tensor], pattern: Pattern
) -> dict[str, int]:
    """Element floors in blocks: enough blocks for the count, and one per block row the
    floor spreads over (a classifier's floor of one weight per row stays one per row)."""
    area = pattern.a * pattern.b
    out = {}
    for fqn, floor in floors.items():
        block_rows = sizes[fqn].shape[0]
        out[fqn] = min(sizes[fqn].numel(), max(-(-floor // area), min(floor, block_rows)))
    return out


def weighted_topk(
    scores: dict[str, torch.Tensor],
    sizes: dict[str, torch.Tensor],
    keep: int,
    floors: dict[str, int] | None = None,
    tiebreak: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Units of largest score over all layers, taken in order while their sizes fit `keep`.

    As masks.global_topk, with a size per unit: ties go to the larger `tiebreak`, then to
    the lower position; a layer the ranking starves first keeps its floor (in units),
    spread over its rows, and the rest of the room goes to the best remaining units.
    """
    fqns = list(scores)
    flat = torch.cat([scores[f].flatten() for f in fqns])
    weight = torch.cat([sizes[f].flatten() for f in fqns]).double()
    order = torch.arange(flat.numel())
    if tiebreak is not None:
        second = torch.cat([tiebreak[f].flatten() for f in fqns])
        order = torch.sort(second, descending=True, stable=True).indices
    order = order[torch.sort(flat[order], descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    counts = [scores[f].numel() for f in fqns]
    starts = dict(zip(fqns, torch.tensor([0, *counts]).cumsum(0).tolist()))
    forced = torch.zeros(flat.numel(), dtype=torch.bool)
    while True:  # each pass forces at least one more layer's floor, so it ends
        kept = forced.clone()
        rest = order[~forced[order]]
        room = keep - float(weight[forced].sum())
        kept[rest[weight[rest].cumsum(0) <= room + 0.5]] = True
        chunks = dict(zip(fqns, torch.split(kept, counts)))
        hungry = [f for f in fqns if floors and starved(chunks[f].view_as(scores[f]), floors[f])]
        if not hungry:
            return {f: chunks[f].view_as(scores[f]) for f in fqns}
        for fqn in hungry:
            start, shape = starts[fqn], scores[fqn].shape
            picks = spread_picks(rank[start : start + shape.numel()].view(shape), floors[fqn])
            forced[start + picks] = True


# --- the Method side: --pattern on a method's config, its masks, its report -------------


def method_pattern(method: Method) -> Pattern | None:
    """The method's parsed `config.pattern` (None without one).

    Raises:
        InputError: a malformed pattern, or a method that removes channels (its budget
            counts FLOPs or volume, not weights).
    """
    text = method.config.pattern
    if text is None:
        return None
    pattern = parse_pattern(text)
    if method.budget.metric != "weights":
        raise InputError(
            f"method {method.name!r} removes whole channels to a {method.budget.metric} budget; "
            f"--pattern {text} is for the weight-sparsity methods (with --sparsity), e.g. "
            "magnitude-global, fcpts, gmp"
        )
    return pattern


def select_masks(
    method: Method,
    scores: dict[str, torch.Tensor],
    keep_total: int,
    floors: dict[str, int] | None = None,
    tiebreak: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The method's global masks: per weight (masks.global_topk) or in units of its pattern."""
    if method.pattern is None:
        return global_topk(scores, keep_total, floors, tiebreak)
    return pattern_masks(scores, method.pattern, keep_total, floors, tiebreak)


def layer_masks(
    method: Method,
    scores: dict[str, torch.Tensor],
    counts: dict[str, int],
    floors: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks keeping `counts[fqn]` weights per layer, in units of the method's pattern.

    N:M fixes each layer's sparsity, so per-layer counts cannot be honoured: the layers to
    pattern are chosen as for a global method, on the same scores, to the counts' total.
    """
    if method.pattern is not None and method.pattern.kind == "nm":
        return pattern_masks(scores, method.pattern, sum(counts.values()))
    return {
        f: select_masks(method, {f: s}, counts[f], floors and {f: floors[f]})[f]
        for f, s in scores.items()
    }


def pattern_report(method: Method) -> dict:
    """The report's pattern fields ({} without one): the user's text, the layers whose
    weights carry the pattern (some zero, every group / block obeying it), and for N:M
    the sparsities whole layers reach."""
    if getattr(method, "pattern", None) is None:
        return {}
    weights = {f: weight_of(m).detach() for f, m in method.layers.items()}
    chosen = [f for f, w in weights.items() if bool((w == 0).any()) and holds(w, method.pattern)]
    report = {"pattern": method.config.pattern, "pattern_layers": chosen}
    if method.pattern.kind == "nm":
        shapes = {f: w.shape for f, w in weights.items()}
        reached, most = nm_reach(shapes, method.pattern, chosen)
        report["pattern_reach"] = {"sparsity": reached, "max": most}
    return report


def pattern_hint(report: dict) -> str:
    """For a missed budget: the sparsities an N:M pattern reaches on whole layers ('' if none)."""
    reach = report.get("pattern_reach")
    if not reach:
        return ""
    return (
        f"; {report['pattern']} fixes each patterned layer's sparsity and leaves the rest "
        f"dense, so whole layers reach sparsity {reach['sparsity']:.4f} nearest the request "
        f"(at most {reach['max']:.4f} on this model): ask for that"
    )
