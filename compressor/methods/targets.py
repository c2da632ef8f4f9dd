"""Whether a method met its budget, and when not, a message that says why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from compressor.budget import Budget
from compressor.errors import BelowSmallestNetworkError, TargetNotReachedError
from compressor.pattern_masks import pattern_hint
from compressor.surgery.pins import describe_pins

if TYPE_CHECKING:
    from compressor.methods.base import Method

TARGET_TOLERANCE = 0.005  # DESIGN.md: achieved within 0.5 % of the request


def check_target(report: dict, budget: Budget) -> None:
    """Raises TargetNotReachedError unless the achieved value is within tolerance."""
    if budget.metric == "latency" and report.get("latency", {}).get("measured_speedup"):
        return  # the exported graph's measured check replaces the table's (latency_check)
    if budget.metric != "weights":
        achieved = report.get("achieved", {}).get("keep")
    else:
        achieved = 1.0 - report["achieved"]["sparsity"]
    if achieved is None:
        raise TargetNotReachedError(
            f"method {report['method']!r} reported no achieved {budget.metric}"
        )
    if abs(achieved - budget.keep) > TARGET_TOLERANCE + 1e-12:
        # the message carries the why: a failed run writes no report to look in
        hint = pattern_hint(report)
        why = hint[2:] if hint else report.get("miss") or "the method recorded no reason"
        raise TargetNotReachedError(
            f"{report['method']}: asked for {budget.describe()} but reached keep fraction "
            f"{achieved:.4f} (target {budget.keep:.4f}): {why}"
        )


def with_pins(exc: TargetNotReachedError, model: nn.Module, method: Method) -> Exception:
    """A structured method's budget error, naming the ops that pin the most channels.

    Falls back to `exc` itself when the method has no example inputs, counts weights, or
    the model cannot be analysed (the budget error is the one to report then).
    """
    example = getattr(method, "example", None)
    if example is None or method.budget.metric == "weights":
        return exc
    try:
        pins = describe_pins(model, example)
    except Exception:  # an explanation must never replace the error it explains
        return exc
    if not pins:
        return exc
    if isinstance(exc, BelowSmallestNetworkError):  # a latency re-fit reads its ratio
        return BelowSmallestNetworkError(f"{exc}; {pins}", exc.ratio)
    return TargetNotReachedError(f"{exc}; {pins}")
