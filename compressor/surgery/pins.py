"""Which ops keep channels from being removed: the explanation a missed budget needs.

A structured budget fails as "below the smallest network" when most channels are fixed; on
a graph full of ops surgery cannot see through, that says nothing about why. Every fixed
channel carries the reason that first fixed it ("unsupported op: OnnxFoo 'x' at node 'x'"),
so counting channels per reason names the culprits.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from compressor.surgery.graph import INPUT_REASON, Analysis, analyse

# Reasons that are no op's doing: a model's own inputs and outputs are never removable.
_NOT_OPS = (INPUT_REASON, "model output")


def pinned_counts(analysis: Analysis) -> tuple[int, int, Counter]:
    """(fixed channels, all channels, channels per pinning reason) over prunable groups.

    Only groups some layer produces count: those are the channels a budget could remove.
    Each fixed channel counts once per reason that fixed one of its elements.
    """
    producing = {g.id for g in analysis.groups if g.producers}
    total = sum(g.size for g in analysis.groups if g.id in producing)
    fixed = sum(int(g.fixed.sum()) for g in analysis.groups if g.id in producing)
    seen: dict[str, set[tuple[int, int]]] = {}
    for element, reason in analysis.uf.reasons.items():
        hit = analysis.channel_of.get(analysis.uf.find(element))
        if hit is not None and hit[0] in producing and not reason.startswith(_NOT_OPS):
            seen.setdefault(reason, set()).add(hit)
    return fixed, total, Counter({reason: len(hits) for reason, hits in seen.items()})


def describe_pins(model: nn.Module, example_inputs: tuple | torch.Tensor, top: int = 3) -> str:
    """One sentence naming the `top` ops that pin the most channels of `model`.

    Returns '' when no op pins any channel. Does not modify `model`.
    """
    fixed, total, counts = pinned_counts(analyse(model, example_inputs))
    if not counts:
        return ""
    worst = ", ".join(
        f"{_op_first(reason)} pins {count:,} channel{'s' * (count != 1)}"
        for reason, count in counts.most_common(top)
    )
    return f"{fixed:,} of {total:,} channels cannot be removed; most pinned by: {worst}"


def _op_first(reason: str) -> str:
    """'unsupported op: OnnxFoo 'x' at node 'x'' -> "op OnnxFoo 'x' at node 'x' (unsupported op)"."""
    why, sep, label = reason.partition(": ")
    return f"op {label} ({why})" if sep else reason
