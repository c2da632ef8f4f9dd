"""The structured methods' layer floor (`min_keep`): top-1 and measured speed-up per floor.

    .venv/bin/python -m bench.latency_floor   # BAR-tied, GSS: 3 models, floors 0 and 0.375
    .venv/bin/python -m bench.latency_floor --archs resnet20 --methods BAR-tied --floors 0,0.25,0.5
    .venv/bin/python -m bench.latency_floor --flops 4 --methods BAR-tied,BAR-mixed,GSS-structured

Each cell is a bench.latency row on its reduced setup (5k Fashion-MNIST images, 3 epochs after
pruning starts, round_to 8, onnxruntime with 1 thread) with `min_keep` set to the floor,
pruned straight to a measured 2x at batch 1 with `--budget-metric latency` (the toolkit's own
check times the exported graph), or with `--flops F` to F times fewer FLOPs (then timed).
Cells are checkpointed in bench/checkpoints/latency_floor.json.
"""

from __future__ import annotations

import argparse

import torch

from bench import latency as L
from bench import latency_methods as lm
from bench.common import machine, write_section
from bench.latency_search import CellStore
from compressor.budget import Budget
from compressor.errors import CompressorError, InputError
from compressor.surgery.fit import check_min_keep
from exporters.latency import graph_measurer

FLOORS = (0.0, 0.375)
METHODS = ("BAR-tied", "GSS-structured")
TARGET = 2.0


def floor_cell(ctx: L.Context, name: str, floor: float, flops: float | None = None) -> dict:
    """`name` at a measured 2x (batch 1), or at `flops` times fewer FLOPs, with every layer
    kept at `floor` or more."""
    row = {"model": ctx.arch, "method": name, "floor": floor}
    try:
        if flops is None:
            model, info = lm.build_latency_model(
                name, ctx.dense, ctx.data, TARGET, align=lm.ALIGN, epochs=ctx.setup.epochs,
                measure=graph_measurer(ctx.example, threads=1, batches=(1,)),
                extra={"min_keep": floor},
            )  # fmt: skip
        else:
            options = lm.schedule(name, ctx.setup.epochs, probe=False)
            options |= {"round_to": lm.ALIGN, "min_keep": floor}
            budget = Budget("flops", 1.0 / flops)
            model, info = lm.prune_ours(name, ctx.dense, ctx.data, budget, options).model, {}
    except CompressorError as exc:  # the toolkit's check missed: a result, not a crash
        return row | {"error": str(exc).splitlines()[0]}
    result = L.measured(ctx, model, ctx.setup.batches_timed, ctx.setup.rounds)
    met = flops is not None or abs(result["speedup"]["1"] / TARGET - 1) <= ctx.setup.tolerance
    return row | {"met": met} | L.describe(ctx, model, result) | info


def budget_of(args) -> str:
    return f"{args.flops:g}x FLOPs" if args.flops else f"{TARGET:g}x latency"


def budget_key(row: dict) -> str:
    return row.get("budget", f"{TARGET:g}x latency")  # cells of the first run: latency


def table(rows: list[dict]) -> str:
    lines = [
        "| budget | model | method | floor | top-1 % | speed-up b1 | speed-up b32 | FLOPs x "
        "| live channels |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {budget_key(r)} | {r['model']} | {r['method']} | {r['floor']:g}"
        if "error" in r:
            lines.append(f"{head} | {r['error']} |||||")
            continue
        channels = ",".join(str(c) for c in r["channels"].values())
        lines.append(
            f"{head} | {r['top-1 %']} | "
            f"{r['speed-up b1']:.2f}x{'' if r['met'] else ' (missed)'} | "
            f"{r['speed-up b32']:.2f}x | {r['FLOPs x']:.2f}x | {channels} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(L.Setup.archs))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--floors", default=",".join(f"{f:g}" for f in FLOORS))
    parser.add_argument("--flops", type=float, help="a FLOP budget (e.g. 4) instead of 2x latency")
    args = parser.parse_args()
    if args.flops is not None and not 1 < args.flops < float("inf"):  # a budget that cuts
        parser.error(f"--flops {args.flops:g}: give the FLOP reduction, above 1, e.g. --flops 4")
    torch.set_num_threads(1)  # a shared machine: more threads only contend
    setup = L.REDUCED
    archs, methods = args.archs.split(","), args.methods.split(",")
    try:
        floors = [check_min_keep(L._parsed(float, f)) for f in args.floors.split(",")]
    except InputError as exc:
        parser.error(str(exc))  # exit 2: bad usage
    unknown = sorted(set(methods) - set(lm.OURS)) + sorted(set(archs) - set(L.Setup.archs))
    if unknown:
        parser.error(
            f"unknown {unknown}; methods: {','.join(lm.OURS)}; archs: {','.join(L.Setup.archs)}"
        )
    store = CellStore(L.CHECKPOINTS / "latency_floor.json", L.settings_of(setup))
    flags = f" --archs {args.archs} --methods {args.methods} --floors {args.floors}"
    flags += f" --flops {args.flops:g}" if args.flops else ""
    suffix = f"/flops{args.flops:g}" if args.flops else ""
    for arch in archs:
        ctx = L.context(setup, arch)
        for name in methods:
            for floor in floors:
                key = f"{arch}/{name}/{floor:g}{suffix}"

                def job(ctx=ctx, name=name, floor=floor) -> dict:
                    return floor_cell(ctx, name, floor, args.flops) | {"budget": budget_of(args)}

                store.run_timed(key, job, flags)
    order = (budget_key, lambda r: r["model"], lambda r: r["method"], lambda r: r["floor"])
    rows = sorted(store.cells.values(), key=lambda r: tuple(key(r) for key in order))
    commands = store.commands("bench.latency_floor")
    body = (
        "## The structured methods' layer floor (`min_keep`)\n\n"
        f"Every cell of {commands} ({machine()}). Each row is pruned straight to a "
        "measured 2x at batch 1 (`--budget-metric latency`) or to a FLOP budget, round_to "
        "8, 3 epochs on 5k Fashion-MNIST images, onnxruntime 1 thread; live channels per "
        "conv in model order.\n\n" + table(rows)
    )
    write_section("latency_floor", body)


if __name__ == "__main__":
    main()
