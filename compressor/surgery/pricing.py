"""One structured budget's price of a keep dict: counted by the CostModel or timed by the table.

Structured methods fit their decision with `Pricer.cost` and report against
`Pricer.dense()`, whatever the metric: "flops" and "volume" are the CostModel's exact
counts, "latency" the LatencyModel's predicted milliseconds (a per-layer table measured on
onnxruntime once per machine and cached; see surgery/latency.py). Under a latency budget
`--round-to` defaults to the table's `rate_multiple` of the model's layers.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn

from compressor.surgery.cost import CostModel
from compressor.surgery.fit import check_round_to
from compressor.surgery.latency import (
    LatencyModel,
    LatencyTable,
    OrtLayerTimer,
    Spec,
    rate_multiple,
)
from compressor.train import show_progress

_TABLE: LatencyTable | None = None  # set by `latency_table()`; default: the cached ORT table


@contextlib.contextmanager
def latency_table(table: LatencyTable) -> Iterator[LatencyTable]:
    """Within the block, latency budgets price decisions with `table` (e.g. a fake timer's)."""
    global _TABLE
    saved, _TABLE = _TABLE, table
    try:
        yield table
    finally:
        _TABLE = saved


def default_table() -> LatencyTable:
    """The table in use: `latency_table()`'s, else this machine's cached onnxruntime table."""
    return _TABLE if _TABLE is not None else LatencyTable(ProgressTimer(OrtLayerTimer()))


class ProgressTimer:
    """An OrtLayerTimer that says on a terminal how many layer shapes it has timed so far."""

    def __init__(self, timer: OrtLayerTimer):
        self.timer, self.count = timer, 0

    def __call__(self, spec: Spec) -> float:
        self._tick()
        return self.timer(spec)

    def pair(self, spec: Spec) -> float:
        """The wrapped timer's pair-chain cost (surgery/latency.py `LatencyTable.lookup`)."""
        self._tick()
        return self.timer.pair(spec)

    def _tick(self) -> None:
        self.count += 1
        if show_progress():  # first use on a machine times a few hundred shapes (README)
            sys.stderr.write(f"\rlatency table: timing layer shape {self.count} in onnxruntime")
            sys.stderr.flush()

    def overhead(self) -> float:
        """The wrapped timer's fixed cost of one graph run."""
        return self.timer.overhead()


class Pricer:
    """The cost of a keep dict in `metric` ("flops", "volume" or "latency").

    Args:
        costs: The CostModel of `model`.
        model: The network (not modified).
        example: Example inputs (a tuple, batch first).
        metric: The budget's metric.
    """

    def __init__(self, costs: CostModel, model: nn.Module, example: tuple, metric: str):
        self.costs, self.metric = costs, metric
        self.latency = None
        if metric == "latency":
            self.latency = LatencyModel(costs, model, example, default_table())
        self._dense = self.cost({})

    def cost(self, keep: dict) -> float:
        """The decision's price: predicted ms under latency, the exact count otherwise."""
        if self.latency is not None:
            return self.latency.cost(keep)
        return float(self.costs.cost(keep, self.metric))

    def dense(self) -> float:
        """The unslimmed model's price."""
        return self._dense

    def counted(self) -> str:
        """The CostModel metric that stands in for this one in per-channel weights."""
        return "flops" if self.metric == "latency" else self.metric

    def per_count(self) -> float:
        """Price units per unit of `counted()` at the dense model (1 unless latency)."""
        if self.latency is None:
            return 1.0
        return self._dense / float(self.costs.dense("flops"))

    def rate(self, cut: dict) -> float:
        """Price units per counted unit (`counted()`) that the cut `cut` saves: 1 for counted
        metrics; under latency the table's ms saved per MAC saved from the dense model,
        `per_count()` when the cut saves no MACs. A layer's time is not proportional to
        its MACs (depthwise convs and narrow layers run at a fraction of a wide GEMM's MAC
        rate), so a price per MAC that holds for the whole model misprices each part."""
        if self.latency is None:
            return 1.0
        saved = float(self.costs.dense("flops") - self.costs.cost(cut, "flops"))
        if saved <= 0.0:
            return self.per_count()
        return max(0.0, self._dense - self.latency.cost(cut)) / saved

    def round_to(self, requested: int | None) -> int:
        """--round-to: the user's when given, else the table's rate multiple (latency) or 1."""
        if requested is not None:
            return check_round_to(requested)
        if self.latency is None:
            return 1
        return rate_multiple(self.latency.table, self.latency.specs({}))

    def save(self) -> None:
        """Caches what the latency table measured (nothing to do for counted metrics)."""
        if self.latency is not None and self.latency.table.measured:
            self.latency.table.save()
            if show_progress() and isinstance(self.latency.table.timer, ProgressTimer):
                sys.stderr.write("\n")  # end the counter's line

    def report(self, after: float) -> dict:
        """The latency entries of a report: dense and predicted ms at batch 1 ({} otherwise)."""
        if self.latency is None:
            return {}
        return {"predicted_ms": {"dense": self._dense, "pruned": after}}
