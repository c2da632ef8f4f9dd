"""Which layout each weight of a CSR pack gets, from the sparsity pattern the model carries.

A model pruned to a pattern names it in its report (`report["pattern"]`, e.g. "2:4" or
"1x4", and `report["pattern_layers"]`, the layers pruned to it). Without an explicit block
the pack follows it: RxC layers as block-CSR with RxC blocks, N:M layers in the N:M layout
(`exporters.csr_nm`), every other weight as plain CSR. An explicit block applies to every
weight, as before patterns existed; when it does not match the model's pattern (or the
model has none and the block is not 1x1) the pack carries a warning naming the padding
ratio, stored elements / non-zeros, so that a user sees what the block costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.pattern_layers import model_pattern, prunable_weights
from compressor.patterns import Pattern, eligible, group_sums, holds

Layout = tuple[int, int] | Pattern  # a block shape (R, C), or an N:M Pattern


@dataclass
class Plan:
    """The pack's layouts.

    Attributes:
        block: the block shape of every weight not in `layouts`.
        layouts: weight name -> its own layout (pattern layers without an explicit block).
        pattern: the model's pattern text, None without one.
        warnings: what the user should know about the choice (one line each).
    """

    block: tuple[int, int]
    layouts: dict[str, Layout] = field(default_factory=dict)
    pattern: str | None = None
    warnings: list[str] = field(default_factory=list)


def plan_layouts(model: nn.Module, report: dict | None, block: tuple[int, int] | None) -> Plan:
    """The layout of each weight: `block` for all when given, else the model's pattern's."""
    pattern, layers = model_pattern(model, report)
    text = pattern.text if pattern else None
    if block is not None:
        block = tuple(block)
        note = _mismatch(pattern, block, prunable_weights(model))
        return Plan(block, {}, text, [note] if note else [])
    if pattern is None:
        return Plan((1, 1))
    weights = prunable_weights(model)
    plan = Plan(pattern.group if pattern.kind == "block" else (1, 1), pattern=text)
    for layer in layers:
        name = f"{layer}.weight"
        if name not in weights:
            plan.warnings.append(
                f"{layer}, a {text} layer in the report, has no Conv/Linear weight"
            )
        elif pattern.kind == "block":
            continue  # the pack's block already
        elif eligible(weights[name].shape, pattern) and holds(weights[name], pattern):
            plan.layouts[name] = pattern
        else:
            plan.warnings.append(f"{name} does not follow {text}; packed as plain CSR")
    if pattern.kind == "block":
        pattern_names = {f"{layer}.weight" for layer in layers}
        plan.layouts = {name: (1, 1) for name in weights if name not in pattern_names}
    return plan


def padding_ratio(weights: dict[str, torch.Tensor], block: tuple[int, int]) -> float:
    """Stored elements / non-zeros of `weights` packed in `block`s (1.0 without non-zeros)."""
    unit = Pattern("block", *block)
    stored = nonzero = 0
    for weight in weights.values():
        counts = group_sums((weight != 0).to(torch.float32), unit)
        stored += int((counts > 0).sum()) * block[0] * block[1]
        nonzero += int(counts.sum())
    return stored / nonzero if nonzero else 1.0


def _mismatch(pattern: Pattern | None, block: tuple[int, int], weights: dict) -> str | None:
    """The warning for an explicit `block` the model was not pruned to, else None."""
    shape = f"{block[0]}x{block[1]}"
    if pattern is None and block == (1, 1):
        return None
    if pattern is not None and pattern.kind == "block" and pattern.group == block:
        return None
    ratio = padding_ratio(weights, block)
    cost = f"it stores {ratio:.2f}x the non-zeros (padding ratio, stored elements / non-zeros)"
    if pattern is None:
        return (
            f"block {shape} does not match the model, which has no sparsity pattern: {cost}; "
            f"use block 1x1, or prune with --pattern {shape}"
        )
    return (
        f"block {shape} does not match the model's pattern {pattern.text}: {cost}; omit "
        "--block to pack in the pattern's layout"
    )
