"""What a ResNet-20 stage's width costs in onnxruntime: stage widths set by hand, timed.

    .venv/bin/python -m bench.stage_widths      # ~2 min on an idle 2-core machine

ResNet-20 (zoo, untrained, 28x28 Fashion-MNIST inputs) built at fixed widths per stage
(stem and stage 1, stage 2, stage 3; the zoo's channel scaling replaced for the build), as
a tied slimmed network would be, and timed against the dense model (onnxruntime, 1
intra-op thread, batch 1 and 32, median of 5 checks of 7 alternating rounds). Asks
whether cutting stage 2 from 16 channels (one blocked-kernel width) to 8 saves the time
the latency table prices it at, and what a stage 3 off the 16-channel blocks (40) costs
against one on them (32, 48). Writes the RESULTS.md section stage_widths.
"""

from __future__ import annotations

import statistics

import torch

from bench.common import machine, markdown_table, write_section
from compressor import zoo
from compressor.data import load_data
from compressor.stats import measure
from exporters.latency import graph_measurer

WIDTHS = ((8, 16, 40), (8, 8, 40), (8, 16, 32), (8, 8, 32), (8, 16, 48), (8, 8, 48))
CHECKS = 5


def build(widths: tuple[int, int, int] | None) -> torch.nn.Module:
    """ResNet-20 at 28x28 with stage widths `widths` (None: the dense 16, 32, 64)."""
    scaled = zoo._scaled
    if widths is not None:
        zoo._scaled = lambda c, w: dict(zip((16, 32, 64), widths))[c]
    try:
        return zoo.build("resnet20", in_channels=1, num_classes=10, input_size=(28, 28)).eval()
    finally:
        zoo._scaled = scaled


def main() -> None:
    torch.set_num_threads(1)
    data = load_data("fashion-mnist", seed=0, limit=256)
    measurer = graph_measurer(data.sample_inputs(2), threads=1, batches=(1, 32))
    x, dense, rows = data.sample_inputs(1), build(None), []
    for widths in WIDTHS:
        model = build(widths)
        timed = [measurer(dense, model) for _ in range(CHECKS)]
        row = {"stage widths": "/".join(map(str, widths))}
        row["FLOPs x"] = round(measure(dense, x).flops / measure(model, x).flops, 2)
        for batch in ("1", "32"):
            ratios = [t["dense"][batch] / t["pruned"][batch] for t in timed]
            row[f"speed-up b{batch}"] = round(statistics.median(ratios), 2)
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(rows, list(rows[0]))
    print(table)
    write_section(
        "stage_widths",
        "## What a stage's width costs: ResNet-20 at hand-set stage widths (onnxruntime)\n\n"
        "`.venv/bin/python -m bench.stage_widths` on " + machine() + "; untrained ResNet-20 "
        "at 28x28, every block of a stage at its width (a tied network), against the dense "
        f"16/32/64; median of {CHECKS} checks of 7 alternating rounds, 1 intra-op thread.\n\n"
        + table,
    )


if __name__ == "__main__":
    main()
