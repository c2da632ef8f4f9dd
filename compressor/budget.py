"""Budgets: what a user asks a method to reach.

`4x` reduces the method's cost metric to 1/4; `75%` or `0.75` given as a sparsity is the
fraction of zero weights. Both end up as a `Budget` whose `keep` is the fraction of the
metric that survives, so methods never parse strings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compressor.errors import InputError

METRICS = ("weights", "flops", "volume", "latency")  # latency: predicted ms, then measured
BUDGET_FORMS = "a reduction factor like '4x' (> 1), a sparsity like '75%' or '0.75' (in [0, 1))"
_FACTOR = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX]\s*$")
_PERCENT = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """A compression target.

    Attributes:
        metric: what is counted: "weights" (prunable weights), "flops", "volume" or
            "latency" (onnxruntime milliseconds at batch 1).
        keep: the fraction of the metric that survives, in (0, 1].
    """

    metric: str
    keep: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"unknown budget metric {self.metric!r}; use one of {METRICS}")
        if not (0.0 < self.keep <= 1.0) or math.isnan(self.keep):
            raise InputError(f"budget keep fraction {self.keep!r} must be in (0, 1]")

    @property
    def sparsity(self) -> float:
        """The fraction of the metric removed (for weights: the fraction of zeros)."""
        return 1.0 - self.keep

    @property
    def factor(self) -> float:
        """The reduction factor: 4.0 for a `4x` budget."""
        return 1.0 / self.keep

    def describe(self) -> str:
        if self.metric == "weights":
            return f"sparsity {self.sparsity:.2%}"
        return f"{self.metric} / {self.factor:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "keep": self.keep, "factor": self.factor}


def parse_sparsity(text: str | float) -> Budget:
    """Parses a sparsity given as `0.9`, `90%` or a float into a weights budget.

    Raises:
        InputError: the value is not a number in [0, 1) (or [0 %, 100 %)).
    """
    value = _sparsity_value(text)
    if not (0.0 <= value < 1.0):
        raise InputError(
            f"sparsity {text!r} is outside [0, 1); give the fraction of zero weights, "
            "e.g. 0.9 or 90%"
        )
    return Budget("weights", 1.0 - value)


def _sparsity_value(text: str | float) -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip()
        match = _PERCENT.match(raw)
        try:
            value = float(match.group(1)) / 100.0 if match else float(raw)
        except ValueError:
            raise InputError(
                f"sparsity {text!r} is not a number; accepted: {BUDGET_FORMS}"
            ) from None
    if math.isnan(value) or math.isinf(value):
        raise InputError(f"sparsity {text!r} is not a finite number; accepted: {BUDGET_FORMS}")
    return value


def parse_budget(text: str | float, metric: str = "weights") -> Budget:
    """Parses `4x` (reduction factor) or a sparsity (`75%`, `0.75`) into a Budget.

    Args:
        text: the user's value.
        metric: the cost metric the budget applies to (see METRICS).

    Raises:
        InputError: malformed value (`0x`, `-2x`, `4y`, `150%`, `nan`, empty, ...).
    """
    raw = str(text).strip()
    if not raw:
        raise InputError(f"empty budget; accepted: {BUDGET_FORMS}")
    match = _FACTOR.match(raw)
    if match:
        factor = float(match.group(1))
        if not (factor > 1.0) or math.isinf(factor):
            raise InputError(
                f"budget {raw!r}: the reduction factor must be a finite number > 1, e.g. 4x"
            )
        return Budget(metric, 1.0 / factor)
    if raw[-1:] in "xX" or not re.match(r"^[-+0-9.%eE\s]+$", raw):
        raise InputError(f"budget {raw!r} is malformed; accepted: {BUDGET_FORMS}")
    sparsity = parse_sparsity(raw)
    if sparsity.keep == 1.0 and metric != "weights":
        raise InputError(f"budget {raw!r} removes nothing; accepted: {BUDGET_FORMS}")
    return Budget(metric, sparsity.keep)
