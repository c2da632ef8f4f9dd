"""How far latency measurements stray on a shared machine: the budget's check and the table.

    .venv/bin/python -m bench.latency_noise      # about 4 minutes on an idle machine

1. The check. A latency budget's check (exporters/latency.py) times the dense and the
   slimmed graph in alternating rounds and reads the speed-up at batch 1. The check is
   repeated CHECKS_RUN times on fixed graphs (untrained ResNet-20, tied, 28x28,
   channel-magnitude to three table keeps; fresh sessions per check) and the spread of
   single checks is set beside that of the medians of consecutive triples (what
   `compressor.latency_check` reads once a single check misses).
2. The table. TABLE_SPECS layer shapes are timed as the latency table times them
   (surgery/latency.py OrtLayerTimer) on the wall clock and on the process's CPU clock,
   twice on the idle machine and twice beside a busy process pinned to the same core; each
   entry is set against the first idle one. A table entry is cached for good, so one timed
   while other work ran misprices that shape in every later budget.

Tried and dropped: loading each graph into three sessions and rotating the check's rounds
through them left the check's spread as it was (a stray check is fast or slow for its
whole length), and timing the check on the CPU clock did too (4-5 of 16 checks >10 % off,
against 4-6 on the wall clock). Writes the RESULTS.md section latency_noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.common import machine, markdown_table, write_section
from compressor import zoo
from compressor.budget import Budget
from compressor.data import load_data
from compressor.latency_check import CHECKS
from compressor.methods import prune
from compressor.surgery.latency import OrtLayerTimer
from exporters import latency

KEEPS = (0.15, 0.3, 0.5)  # table latency keeps of the slimmed networks
CHECKS_RUN = 24  # repeated checks (8 triples)
# (in, out, input size) of 3x3 convs: free and aligned counts, blocked and plain layouts
TABLE_SPECS = (
    (1, 3, 28),
    (3, 35, 12),
    (11, 34, 12),
    (5, 5, 28),
    (16, 13, 28),
    (16, 16, 28),
    (21, 16, 14),
    (32, 32, 14),
    (64, 64, 7),
    (8, 21, 14),
)
CLOCKS = {"wall": time.perf_counter, "CPU": time.process_time}


def graphs(x: torch.Tensor) -> dict[str, bytes]:
    """The dense and the slimmed ResNet-20 graphs, exported once."""
    torch.manual_seed(0)
    dense = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=(28, 28)).eval()
    data = load_data("fashion-mnist", seed=0, limit=256)
    found = {"dense": latency.onnx_graph(dense, (x,))}
    for keep in KEEPS:
        options = {"finetune_epochs": 0, "bn_batches": 2, "residual": "tied", "round_to": 1}
        slim = prune(dense, "channel-magnitude", Budget("latency", keep), data, **options)
        found[f"keep {keep:g}"] = latency.onnx_graph(slim.model, (x,))
    return found


def check_rows(x: torch.Tensor, count: int) -> list[dict]:
    """Part 1: the spread of single checks and of medians of CHECKS, per network."""
    found = graphs(x)
    speedups: dict[str, list[float]] = {name: [] for name in found if name != "dense"}
    for index in range(count):
        timed = latency.measure_graphs(found, (x,), batches=(1,))
        for name, values in speedups.items():
            values.append(timed["dense"]["1"] / timed[name]["1"])
        print(f"check {index + 1} of {count}", flush=True)
    rows = []
    for name, values in speedups.items():
        middle = statistics.median(values)
        triples = [statistics.median(values[i : i + CHECKS]) for i in range(0, count, CHECKS)]
        rows.append(spread({"network": name, "read": "one check"}, values, middle))
        rows.append(spread({"network": name, "read": f"median of {CHECKS}"}, triples, middle))
    return rows


def spread(row: dict, values: list[float], middle: float) -> dict:
    off = [abs(v / middle - 1.0) for v in values]
    return row | {
        "median": f"{statistics.median(values):.2f}",
        "min - max": f"{min(values):.2f} - {max(values):.2f}",
        "> 5 % off": f"{sum(o > 0.05 for o in off)} of {len(values)}",
        "> 10 % off": f"{sum(o > 0.10 for o in off)} of {len(values)}",
    }


def table_entries(clock) -> list[float]:
    """Milliseconds of every TABLE_SPECS shape, timed as the latency table does."""
    timer = OrtLayerTimer(clock=clock)
    base = {"op": "conv2d", "k": [3, 3], "s": [1, 1], "p": [1, 1], "d": [1, 1], "g": 1}
    return [timer(base | {"in": i, "out": o, "hw": [s, s]}) for i, o, s in TABLE_SPECS]


def table_rows() -> list[dict]:
    """Part 2: each condition's entries against the first idle timing, per clock."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})  # the busy process below shares this core
    timed = {name: {} for name in CLOCKS}
    for condition in ("idle", "idle again", "beside a busy process", "beside it again"):
        busy = None
        if condition.startswith("beside"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            os.sched_setaffinity(busy.pid, {core})
        try:
            for name, clock in CLOCKS.items():
                timed[name][condition] = table_entries(clock)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    rows = []
    for name, per in timed.items():
        first = per["idle"]
        for condition, values in list(per.items())[1:]:
            ratios = [v / f for v, f in zip(values, first)]
            rows.append(
                {
                    "clock": name,
                    "timed": condition,
                    "entry / first idle entry, per shape": " ".join(f"{r:.2f}" for r in ratios),
                    "median": f"{statistics.median(ratios):.2f}",
                    "min - max": f"{min(ratios):.2f} - {max(ratios):.2f}",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=CHECKS_RUN)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = load_data("fashion-mnist", seed=0, limit=256).sample_inputs(2)
    checks = markdown_table(rows := check_rows(x, args.checks), list(rows[0]))
    table = markdown_table(rows := table_rows(), list(rows[0]))
    print(checks + "\n\n" + table)
    shapes = ", ".join(f"{i}>{o}@{s}" for i, o, s in TABLE_SPECS)
    write_section(
        "latency_noise",
        "## How far latency measurements stray: the budget's check and the layer table\n\n"
        f"`.venv/bin/python -m bench.latency_noise` on {machine()}.\n\n"
        "**The check.** Untrained ResNet-20 (tied, 28x28) slimmed by channel-magnitude to "
        f"table latency keeps, exported once; {args.checks} repeated checks (fresh sessions, "
        f"{latency.ROUNDS} alternating rounds each), batch 1, 1 intra-op thread; speed-ups "
        "'off' against the median of all checks. A check more than 10 % off is one a latency "
        "budget's tolerance cannot absorb.\n\n" + checks + "\n\n"
        f"**The table.** 3x3 conv shapes ({shapes}: in>out@size) timed as the latency table "
        "times them, per clock: each entry divided by the same shape's first idle entry. "
        "'beside a busy process': a Python busy loop pinned to the timing process's core.\n\n"
        + table,
    )


if __name__ == "__main__":
    main()
