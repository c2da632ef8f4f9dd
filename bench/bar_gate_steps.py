"""BAR's gate phase in steps (`gate_steps`): top-1 at a measured 2x beside Torch-Pruning.

    .venv/bin/python -m bench.bar_gate_steps                       # 3 models, 4 schedules
    .venv/bin/python -m bench.bar_gate_steps --archs resnet20 --schedules 1e+2,20s+3 --seeds 0,1

The grid (bench.latency) gives every row 3 epochs after pruning starts. BAR-tied spends one
of them on its gates, on fixed weights, and fine-tunes two; Torch-Pruning fine-tunes all
three. A schedule "G+F" here trains the gates G ("1e": one epoch, "20s": 20 steps, about a
quarter of an epoch on 5k images) and fine-tunes F epochs. Each BAR cell is pruned straight to
a measured 2x at batch 1 (`--budget-metric latency`, round_to 8, floor 0.375, the toolkit's
own check); the Torch-Pruning cell rebuilds the grid's 2x batch-1 row (its searched ratio,
3 epochs of the same fine-tuning) and is timed again in this run. Seeds vary BAR's gate
sampling; the data order is the bench's fixed one. Cells are checkpointed in
bench/checkpoints/bar_gate_steps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench import latency as L
from bench import latency_methods as lm
from bench.common import machine, write_section
from bench.latency_search import CellStore
from compressor.errors import CompressorError
from exporters.latency import graph_measurer

SCHEDULES = ("1e+2", "1e+3", "20s+2", "20s+3")
TARGET = 2.0
NAME = "BAR-tied"


def parse_schedule(text: str) -> dict:
    """'20s+3' -> BAR options: the gate phase (epochs 'Ne' or steps 'Ns') and fine-tuning."""
    try:
        gates, finetune = text.split("+")
        count, unit = int(gates[:-1]), gates[-1]
        options = {"finetune_epochs": int(finetune)}
        if unit not in "es" or count < 1 or options["finetune_epochs"] < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"schedule {text!r}: give gates+fine-tuning, the gates in epochs or steps, "
            "e.g. 1e+2 or 20s+3"
        ) from None
    return options | ({"epochs": count} if unit == "e" else {"epochs": 1, "gate_steps": count})


def bar_cell(ctx: L.Context, schedule: str, seed: int) -> dict:
    """BAR-tied at a measured 2x (batch 1) under `schedule`."""
    row = {"model": ctx.arch, "method": NAME, "schedule": schedule, "seed": seed}
    measure = graph_measurer(ctx.example, threads=1, batches=(1,))
    extra = parse_schedule(schedule) | {"seed": seed}
    try:
        model, info = lm.build_latency_model(
            NAME, ctx.dense, ctx.data, TARGET, align=lm.ALIGN, epochs=ctx.setup.epochs,
            measure=measure, extra=extra,
        )  # fmt: skip
    except CompressorError as exc:  # the toolkit's check missed: a result, not a crash
        return row | {"error": str(exc).splitlines()[0]}
    return row | finished(ctx, model) | info


def tp_cell(ctx: L.Context, grid: dict) -> dict:
    """Torch-Pruning's grid row at 2x, batch 1, rebuilt at its searched FLOP factor."""
    row = {"model": ctx.arch, "method": lm.TP, "schedule": "3", "seed": 0}
    cell = grid[f"{ctx.arch}/{lm.TP}/2x/b1"]
    model, info = lm.build_row_model(
        lm.TP, ctx.dense, ctx.data, ctx.arch, cell["flops_request"], align=lm.ALIGN,
        epochs=ctx.setup.epochs, probe=False,
    )  # fmt: skip
    return row | finished(ctx, model) | info | {"grid top-1 %": cell["top-1 %"]}


def finished(ctx: L.Context, model) -> dict:
    result = L.measured(ctx, model, ctx.setup.batches_timed, ctx.setup.rounds)
    met = abs(result["speedup"]["1"] / TARGET - 1) <= ctx.setup.tolerance
    return {"met": met} | L.describe(ctx, model, result)


def table(rows: list[dict]) -> str:
    """One line per (model, method, schedule): medians over seeds, and TP's delta."""
    lines = [
        "| model | method | schedule | seeds | top-1 % (median) | vs TP | speed-up b1 | "
        "FLOPs x | every seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["schedule"]), []).append(r)
    tp = {m: g[0]["top-1 %"] for (m, method, _), g in groups.items() if method == lm.TP}
    for (model, method, schedule), group in sorted(groups.items()):
        good = [r for r in group if "error" not in r]
        if not good:
            lines.append(f"| {model} | {method} | {schedule} | {group[0]['error']} ||||||")
            continue
        top1 = statistics.median(r["top-1 %"] for r in good)
        speedup = statistics.median(r["speed-up b1"] for r in good)
        flops = statistics.median(r["FLOPs x"] for r in good)
        delta = f"{top1 - tp[model]:+.2f}" if model in tp and method != lm.TP else ""
        missed = "" if all(r["met"] for r in good) else " (missed)"
        each = " / ".join(f"{r['top-1 %']}" for r in sorted(good, key=lambda r: r["seed"]))
        lines.append(
            f"| {model} | {method} | {schedule} | {len(good)} | {top1:.2f} | {delta} | "
            f"{speedup:.2f}x{missed} | {flops:.2f}x | {each} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(L.Setup.archs))
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: more threads only contend
    setup = L.REDUCED
    archs, schedules = args.archs.split(","), args.schedules.split(",")
    unknown = sorted(set(archs) - set(L.Setup.archs))
    if unknown:
        parser.error(f"unknown archs {unknown}; archs: {','.join(L.Setup.archs)}")
    try:
        for schedule in schedules:
            parse_schedule(schedule)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        parser.error(str(exc))  # exit 2: bad usage
    grid = json.loads((L.CHECKPOINTS / "latency-reduced.json").read_text())["cells"]
    missing = [arch for arch in archs if f"{arch}/{lm.TP}/2x/b1" not in grid]
    if missing:
        parser.error(
            f"no Torch-Pruning 2x batch-1 row for {missing} in the grid's checkpoint; run "
            "bench.latency --reduced --methods Torch-Pruning --targets 2 --batches 1 first"
        )
    store = CellStore(L.CHECKPOINTS / "bar_gate_steps.json", L.settings_of(setup))
    flags = f" --archs {args.archs} --schedules {args.schedules} --seeds {args.seeds}"
    for arch in archs:
        ctx = L.context(setup, arch)
        jobs = {f"{arch}/{lm.TP}": lambda ctx=ctx: tp_cell(ctx, grid)}
        for schedule in schedules:
            for seed in seeds:
                key = f"{arch}/{NAME}/{schedule}/s{seed}"
                jobs[key] = lambda ctx=ctx, schedule=schedule, seed=seed: bar_cell(
                    ctx, schedule, seed
                )
        for key, job in jobs.items():
            store.run_timed(key, job, flags)
    rows = list(store.cells.values())
    commands = store.commands("bench.bar_gate_steps")
    body = (
        "## BAR's gate phase in steps (`gate_steps`) against Torch-Pruning at 2x\n\n"
        f"Every cell of {commands} ({machine()}). BAR-tied is pruned straight to a measured "
        "2x at batch 1 (`--budget-metric latency`, round_to 8, floor 0.375) on the grid's "
        "reduced setup (5k Fashion-MNIST images, onnxruntime 1 thread); a schedule G+F "
        "trains the gates G (1e: one epoch, 20s: 20 steps) and fine-tunes F epochs. "
        "Torch-Pruning is the grid's 2x batch-1 row rebuilt (its searched ratio, 3 epochs "
        "of the same fine-tuning) and timed again in this run.\n\n" + table(rows)
    )
    write_section("bar_gate_steps", body)


if __name__ == "__main__":
    main()
