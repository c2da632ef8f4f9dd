"""Weight masks as parametrizations, and the list of prunable layers.

A method decides masks; this module installs them (`W` becomes `W * mask` on every
forward, so training sees the masked weight) and strips them again, baking the zeros
into the plain weight so nothing of the machinery survives `finalize()`.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.errors import InputError, MachineryLeftError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
# The per-layer floor (issue "Users' models" 6a): a layer keeps at least this share of
# the global density (and at least one weight), spread over its output units, so a global
# ranking cannot empty or nearly empty it and make everything after it constant. Global
# ranking gives layers densities a few times apart (its point); a layer ten times below
# the mean is where a random-init MobileNetV2 at 90 % lost its signal. The last layer
# (the classifier) keeps one weight per output unit: a class whose row is all zero has
# a constant logit.
FLOOR_SHARE = 0.1


class WeightMask(nn.Module):
    """Parametrization multiplying a weight by a fixed 0/1 mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv1d/Conv2d/Linear layers by module path, minus those matching an `exclude` glob."""
    return {
        fqn: module
        for fqn, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
        and not any(fnmatch.fnmatchcase(fqn, pattern) for pattern in exclude)
    }


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's underlying (unmasked) weight, parametrized or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def apply_masks_(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Installs (or replaces) a WeightMask on each layer named in `masks`. In place."""
    for fqn, mask in masks.items():
        module = layers[fqn]
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        parametrize.register_parametrization(module, "weight", WeightMask(mask))


def strip_(model: nn.Module) -> nn.Module:
    """Bakes every parametrization into its plain tensor and removes it. In place."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def bake_masks_(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zeros the masked-out weights directly, without a parametrization. In place."""
    with torch.no_grad():
        for fqn, mask in masks.items():
            weight_of(layers[fqn]).mul_(mask.to(weight_of(layers[fqn]).dtype))


def has_machinery(model: nn.Module, before: frozenset[str] | None = None) -> list[str]:
    """Names what a method left on `model`: parametrizations, hooks, new names (or []).

    Args:
        before: `model_names()` of the model before the method's `prepare()`; then hooks it
            already had are not counted, and every module, parameter and buffer name that
            was not there is (channel removal keeps names, so shapes are not compared;
            modules that `surgery/` puts into a slimmed network are its structure, not the
            method's machinery).
    """
    found = [fqn for fqn, m in model.named_modules() if parametrize.is_parametrized(m)]
    known = before or frozenset()
    found += sorted(name for name in _hooks(model) if name not in known)
    if before is not None:
        found += sorted(name for name in _names(model) if name not in before)
    return found


def check_no_machinery(model: nn.Module, before: frozenset[str], method: str) -> None:
    """The lifecycle's postcondition: `finalize()` left nothing of `method` on `model`.

    Raises:
        MachineryLeftError: a leak (a bug in the method, never the user's input).
    """
    if leftovers := has_machinery(model, before):
        shown = ", ".join(leftovers[:5]) + (
            f" (+{len(leftovers) - 5} more)" if len(leftovers) > 5 else ""
        )
        raise MachineryLeftError(f"{method}: finalize() left machinery on the model: {shown}")


def model_names(model: nn.Module) -> frozenset[str]:
    """Module, parameter and buffer names and hooks of `model`, for `has_machinery(before=)`."""
    return frozenset(_names(model)) | frozenset(_hooks(model))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model: nn.Module) -> list[str]:
    return [
        f"{fqn or '<model>'}: {kind.strip('_').replace('_', ' ')[:-1]} {key}"
        for fqn, module in model.named_modules()
        for kind in _HOOKS
        for key in getattr(module, kind, {})
    ]


def _names(model: nn.Module) -> list[str]:
    surgery = [
        fqn
        for fqn, m in model.named_modules()
        if fqn and type(m).__module__.startswith("compressor.surgery.")
    ]

    def own(name: str) -> bool:
        return not any(name == s or name.startswith(s + ".") for s in surgery)

    names = [f"module {fqn}" for fqn, _ in model.named_modules() if fqn and own(fqn)]
    names += [f"parameter {n}" for n, _ in model.named_parameters() if own(n)]
    return names + [f"buffer {n}" for n, _ in model.named_buffers() if own(n)]


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A mask keeping exactly `keep` entries with the largest scores (ties: lowest index)."""
    flat = scores.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        # stable sort makes equal scores resolve by position, so results are reproducible
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask.view_as(scores)


def layer_floors(shapes: dict[str, torch.Size], keep_total: int) -> dict[str, int]:
    """The fewest weights each layer keeps (FLOOR_SHARE of the global density; one per
    output unit in the last layer).

    A floor of k also means: spread over min(k, rows) output units (`starved`). When the
    budget cannot pay for those floors, every layer keeps one weight.

    Raises:
        InputError: `keep_total` is smaller than the number of layers.
    """
    sizes = {fqn: math.prod(shape) for fqn, shape in shapes.items()}
    density = FLOOR_SHARE * keep_total / max(1, sum(sizes.values()))
    floors = {fqn: min(n, max(1, math.ceil(density * n))) for fqn, n in sizes.items()}
    if shapes:
        last = list(shapes)[-1]
        floors[last] = min(sizes[last], max(floors[last], shapes[last][0]))
    if sum(floors.values()) > keep_total:
        floors = {fqn: 1 for fqn in shapes}
    if sum(floors.values()) > keep_total:
        raise InputError(
            f"the budget keeps {keep_total} weights for {len(shapes)} prunable layers, so some "
            "layer would keep none; lower the sparsity, --exclude layers, or pass "
            "--allow-layer-collapse"
        )
    return floors


def global_topk(
    scores: dict[str, torch.Tensor],
    keep: int,
    floors: dict[str, int] | None = None,
    tiebreak: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks keeping exactly `keep` entries of largest score over all layers together.

    Ties go to the larger `tiebreak` (when given), then to the lower position. With
    `floors`, a layer the ranking starves (see `starved`) first keeps its floor, spread over
    its output units (`spread_picks`), and the rest of the count goes to the best remaining
    entries: the total is still exactly `keep`, and where no layer is starved the masks are
    the plain ranking's.
    """
    fqns = list(scores)
    flat = torch.cat([scores[f].detach().flatten() for f in fqns])
    order = torch.arange(flat.numel())
    if tiebreak is not None:
        second = torch.cat([tiebreak[f].detach().flatten() for f in fqns])
        order = torch.sort(second, descending=True, stable=True).indices
    order = order[torch.sort(flat[order], descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    starts = dict(zip(fqns, torch.tensor([0] + [scores[f].numel() for f in fqns]).cumsum(0)))
    forced = torch.zeros(flat.numel(), dtype=torch.bool)
    while True:  # each pass forces at least one more layer's floor, so it ends
        kept = forced.clone()
        rest = order[~forced[order]]
        kept[rest[: max(0, keep - int(forced.sum()))]] = True
        chunks = dict(zip(fqns, torch.split(kept, [scores[f].numel() for f in fqns])))
        hungry = [f for f in fqns if floors and starved(chunks[f].view_as(scores[f]), floors[f])]
        if not hungry:
            return {f: chunks[f].view_as(scores[f]) for f in fqns}
        for fqn in hungry:
            start, shape = int(starts[fqn]), scores[fqn].shape
            picks = spread_picks(rank[start : start + shape.numel()].view(shape), floors[fqn])
            forced[start + picks] = True


def starved(mask: torch.Tensor, floor: int) -> bool:
    """Whether `mask` keeps fewer than `floor` entries or touches fewer than min(floor,
    rows) output units (rows of the weight): a floor in one unit leaves the others dead."""
    rows = mask.reshape(len(mask), -1) if mask.dim() else mask.reshape(1, -1)
    live_rows = int(rows.any(dim=1).sum())
    return int(mask.sum()) < floor or live_rows < min(floor, len(rows))


def spread_picks(rank: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of `count` entries, best rank first, but each row's best before any
    row's second best: the floor reaches min(count, rows) output units."""
    rows = rank.reshape(len(rank), -1) if rank.dim() else rank.reshape(1, -1)
    sorted_rank, columns = torch.sort(rows, dim=1)
    depth = torch.arange(rows.shape[1]).expand_as(rows)
    key = (depth * (int(rank.max()) + 1) + sorted_rank).flatten()
    chosen = torch.sort(key).indices[:count]
    row, position = chosen // rows.shape[1], chosen % rows.shape[1]
    return row * rows.shape[1] + columns[row, position]


def floor_counts(counts: dict[str, int], floors: dict[str, int]) -> dict[str, int]:
    """Per-layer keep counts raised to `floors`, the extra taken from the layers keeping most.

    The total stays the same (the floors' sum never exceeds it: see `layer_floors`).
    """
    counts = dict(counts)
    deficit = sum(max(0, floors[f] - n) for f, n in counts.items())
    counts = {f: max(n, floors[f]) for f, n in counts.items()}
    while deficit > 0:
        richest = max(counts, key=lambda f: counts[f] - floors[f])
        take = min(deficit, counts[richest] - floors[richest])
        counts[richest] -= take
        deficit -= take
    return counts
