"""Layers priced alone or in context: how well the latency table predicts the exported graph.

    .venv/bin/python -m bench.latency_context     # ~10 min on an idle 2-core machine

ResNet-20 (zoo, untrained, 28x28 Fashion-MNIST inputs), tied and mixed, slimmed by
channel-magnitude to a grid of latency budgets on the layer table with no measured check,
so each network is the table's own pick. Two tables: *alone* prices every layer as its own
one-layer graph (TABLE_VERSION 2), *context* prices a same-size conv as its share of a pair
chain (surgery/latency_graphs.py). Each network is exported and timed against the dense
model (onnxruntime, 1 intra-op thread, batch 1, 7 alternating rounds, median of 3 checks).
Read: Spearman's rank correlation of predicted with measured speed-up over the grid (does
a smaller table keep give a faster graph?), the median |log(predicted / measured)|, and
the pairs of neighbouring budgets where the larger network measured over 10 % faster
(cliffs, which a re-fit cannot settle). A last table prices one c -> c 3x3 conv either
side of onnxruntime's 16-channel blocks, alone and in context. Writes the RESULTS.md
section latency_context.
"""

from __future__ import annotations

import math
import statistics

import torch

from bench.common import machine, markdown_table, write_json, write_section
from compressor import zoo
from compressor.budget import Budget
from compressor.data import load_data
from compressor.methods import prune
from compressor.surgery.latency import LatencyTable
from compressor.surgery.pricing import default_table, latency_table
from exporters.latency import graph_measurer

KEEPS = tuple(round(0.16 + 0.02 * i, 2) for i in range(14))  # table keeps 0.16 .. 0.42
CHECKS = 3
COUNTS = (8, 15, 16, 17, 24, 32, 33)  # c -> c 3x3 convs: either side of the 16-channel blocks
SIZES = (7, 14)


def conv_rows(table: LatencyTable) -> list[dict]:
    """A c -> c 3x3 conv's milliseconds past the run's fixed cost, alone and in context."""
    base, rows = table.overhead(), []
    for hw in SIZES:
        for c in COUNTS:
            spec = {"op": "conv2d", "in": c, "out": c, "k": [3, 3], "s": [1, 1], "p": [1, 1]}
            spec |= {"d": [1, 1], "g": 1, "hw": [hw, hw]}
            alone, context = table.alone(spec) - base, table.lookup(spec) - base
            rows.append({"hw": f"{hw}x{hw}", "channels": c})
            rows[-1] |= {"alone us": f"{alone * 1e3:.1f}", "in context us": f"{context * 1e3:.1f}"}
    for row in rows:  # each against the 16-channel conv at its size
        ref = next(r for r in rows if r["hw"] == row["hw"] and r["channels"] == 16)
        for key in ("alone", "in context"):
            row[f"{key} / 16"] = f"{float(row[key + ' us']) / float(ref[key + ' us']):.2f}"
    return rows


class AloneTable(LatencyTable):
    """The same cached entries, every layer priced as its own one-layer graph."""

    def __init__(self, table: LatencyTable):
        self.__dict__.update(table.__dict__)

    def lookup(self, spec: dict) -> float:
        return self.alone(spec)


def sweep(residual: str, table: LatencyTable, data, measurer) -> list[dict]:
    """One row per table keep: the fitted network's predicted and measured speed-up."""
    rows = []
    for keep in KEEPS:
        torch.manual_seed(0)
        dense = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=(28, 28)).eval()
        with latency_table(table):
            result = prune(
                dense,
                "channel-magnitude",
                Budget("latency", keep),
                data,
                finetune_epochs=0,
                bn_batches=2,
                residual=residual,
            )
        timed = [measurer(dense, result.model) for _ in range(CHECKS)]
        measured = statistics.median(t["dense"]["1"] / t["pruned"]["1"] for t in timed)
        predicted = 1.0 / result.report["achieved"]["keep"]
        rows.append({"keep": keep, "predicted": predicted, "measured": measured})
        print(residual, type(table).__name__, rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Rank correlation, median log error, and cliffs over one sweep."""
    measured = [r["measured"] for r in rows]
    errors = [abs(math.log(r["predicted"] / r["measured"])) for r in rows]
    cliffs = sum(1 for a, b in zip(measured, measured[1:]) if b > a * 1.10)
    return {
        "spearman": round(_spearman([-r["keep"] for r in rows], measured), 3),
        "median |log pred/meas|": round(statistics.median(errors), 3),
        "within 10 %": f"{sum(e <= math.log(1.1) for e in errors)} of {len(rows)}",
        "cliffs": cliffs,
    }


def _spearman(a: list[float], b: list[float]) -> float:
    rank = lambda xs: {i: r for r, (i, _) in enumerate(sorted(enumerate(xs), key=lambda t: t[1]))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def main() -> None:
    torch.set_num_threads(1)
    data = load_data("fashion-mnist", seed=0, limit=256)
    measurer = graph_measurer(data.sample_inputs(2), threads=1, batches=(1,))
    context = default_table()
    tables = {"alone": AloneTable(context), "context": context}
    rows, raw = [], {}
    for residual in ("tied", "mixed"):
        for name, table in tables.items():
            raw[f"{residual} {name}"] = sweep(residual, table, data, measurer)
            rows.append({"model": f"resnet20 ({residual})", "table": name})
            rows[-1] |= summary(raw[f"{residual} {name}"])
    convs = conv_rows(context)
    context.save()
    grid = [{"keep": k} for k in KEEPS]
    for key, sweep_rows in raw.items():
        for cell, r in zip(grid, sweep_rows):
            cell[key] = f"{r['predicted']:.2f} / {r['measured']:.2f}"
    columns = ["model", "table", "spearman", "median |log pred/meas|", "within 10 %", "cliffs"]
    text = markdown_table(rows, columns) + "\n\npredicted / measured speed-up per table keep:\n\n"
    text += markdown_table(grid, ["keep", *raw])
    text += "\n\nOne c -> c 3x3 conv as the table prices it, past the run's fixed cost:\n\n"
    text += markdown_table(convs, list(convs[0]))
    print(text)
    write_json("latency_context", raw)
    write_section(
        "latency_context",
        "## Layers priced alone or in context: the latency table against the graph\n\n"
        "`.venv/bin/python -m bench.latency_context` on " + machine() + "; channel-magnitude "
        "fits on the table at each keep (no measured check), ResNet-20 at 28x28, onnxruntime "
        "1 intra-op thread, batch 1, median of 3 checks of 7 alternating rounds. spearman: "
        "rank correlation of table keep with measured speed-up (1: a smaller budget always "
        "ran faster); cliffs: neighbouring keeps where the larger network measured over 10 % "
        "faster.\n\n" + text,
    )


if __name__ == "__main__":
    main()
