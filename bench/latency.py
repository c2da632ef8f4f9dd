"""Structured pruning at *measured* speed-up targets: BAR, magnitude, GSS vs Torch-Pruning.

    .venv/bin/python -m bench.latency --quick        # smoke run: ResNet-20, 2x, batch 32
    .venv/bin/python -m bench.latency                # the benchmark (hours; a quiet machine)
    .venv/bin/python -m bench.latency --reduced      # ResNet-20 at 2x and 4x, batch 1 (~1 h)
    .venv/bin/python -m bench.latency --report-only  # tables and plots from the checkpoint
    .venv/bin/python -m bench.latency --archs resnet56 --methods BAR-mixed,Torch-Pruning
    .venv/bin/python -m bench.latency --reduced --targets 2,3,4 --batches 1,32  # full grid

ResNet-20, ResNet-56 (width 1) and the zoo MobileNetV2 on Fashion-MNIST, one dense model
per architecture (the same data and epochs for all), then per speed-up target (2x, 3x, 4x)
and per batch size the target is measured at (1, 32), one row per method: BAR-mixed,
BAR-tied, channel-magnitude, structured GSS, and Torch-Pruning 1.6.1 (MagnitudePruner, L2,
round_to 8). Every method trains the same epochs after pruning starts.

Each row reaches its target by itself. Methods with the toolkit's `latency` budget metric
take a batch-1 target directly, with the measured check (at batch 1) and re-fits `compress
prune` runs (`prune(..., measure_latency=graph_measurer(...))`); when that check fails, the
row records its error (`latency_error`) and falls back to the search. Otherwise (and for
every batch-32 target) the harness searches the FLOP budget (`latency_search.search_factor`):
probes prune on a short schedule, export to ONNX and time against the dense model
(onnxruntime, 1 thread, alternating rounds, medians) until the speed-up is within
`probe_tolerance`; then the full schedule runs at that budget and is timed again, and the
search goes on with full runs while it misses `tolerance`. Torch-
Pruning's knob is its uniform pruning ratio, searched the same way. The `path` column says
which way a row went. A second table prices alignment: every method at fixed FLOP cuts with
and without round_to 8 (ours: "n/a" while the methods have no round_to).

Every finished cell is written to bench/checkpoints/latency[-reduced].json (tracked, so a
run resumes from a fresh clone too; a smoke run's to bench/out/latency-quick.json); a rerun
resumes. A checkpoint's cells came from its dense models: a dense model trained again to a
different top-1 is refused rather than mixed in. `--section NAME` writes the tables to that
RESULTS.md section instead of `latency`, so a narrowed run (a few rows, new code) leaves the
main table alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import latency_methods as lm
from bench.common import OUT, dense_baseline, machine
from bench.latency_search import CellStore, OrtTimer, search_factor
from compressor.data import load_data
from compressor.errors import CompressorError, InputError, first_line
from compressor.latency_check import CHECKED_BATCH
from compressor.stats import measure
from compressor.train import evaluate
from exporters.latency import graph_measurer

SPEC = "fashion-mnist"
CHECKPOINTS = Path(__file__).with_name("checkpoints")


@dataclass(frozen=True)
class Setup:
    """A run's configuration; a checkpoint is reused only under the same `settings_of`."""

    archs: tuple[str, ...] = ("resnet20", "resnet56", "mobilenetv2")
    targets: tuple[float, ...] = (2.0, 3.0, 4.0)  # measured speed-ups (issue 17 item 5)
    batches: tuple[int, ...] = (1, 32)  # a target is met at one batch size: a row per batch
    methods: tuple[str, ...] = lm.METHODS
    flop_factors: tuple[float, ...] = (2.0, 4.0)  # the alignment table's FLOP cuts
    limit: int | None = 10000  # training images (the test set is the full 10k)
    probe_limit: int = 2000  # training images a probe's short schedule sees
    dense_epochs: int = 10
    epochs: int = 5  # every method after pruning starts (BAR 2 + 3, GSS 3 + 2)
    probe_rounds: int = 7  # timed rounds per probe
    rounds: int = 15  # timed rounds of a row's final measurement
    probe_steps: int = 6  # most probes per row
    final_steps: int = 2  # most full-schedule runs per row
    probe_tolerance: float = 0.05  # probes aim closer than the goal: the final run re-measures
    tolerance: float = 0.10  # the goal: measured speed-up within 10 % of the target

    @property
    def batches_timed(self) -> tuple[int, ...]:
        """Every batch a target is set at, and both of the goal's sizes (1 and 32)."""
        return tuple(sorted({*self.batches, 1, 32}))


QUICK = Setup(
    archs=("resnet20",),
    targets=(2.0,),
    batches=(32,),
    flop_factors=(2.0,),
    limit=2000,
    probe_limit=500,
    dense_epochs=1,
    epochs=2,
    probe_rounds=3,
    rounds=5,
    probe_steps=4,
    final_steps=1,
)
# What two shared cores finish in a session: ResNet-20 only, the goals' 2x and 4x at batch 1
# (batch 32 is still timed on every row), 5k training images, 3 epochs per method.
REDUCED = Setup(
    archs=("resnet20",),
    targets=(2.0, 4.0),
    batches=(1,),
    flop_factors=(4.0,),
    limit=5000,
    probe_limit=1000,
    dense_epochs=8,
    epochs=3,
    rounds=9,
    probe_steps=4,
    final_steps=1,
)


@dataclass
class Context:
    """Per-architecture state shared by its cells: models, data, the timer."""

    setup: Setup
    arch: str
    dense: torch.nn.Module
    data: object
    probe_data: object
    timer: object
    example: tuple


def speedups(timed: dict) -> dict[str, float]:
    return {b: timed["dense"][b] / timed["model"][b] for b in timed["model"]}


def measured(ctx: Context, model, batches, rounds: int) -> dict:
    timed = ctx.timer(ctx.arch, ctx.dense, model, batches, rounds)
    return {"timed": timed, "speedup": speedups(timed)}


def probe_for(ctx: Context, name: str, batch: int, align: int, *, probe: bool):
    """factor -> (speed-up at `batch`, payload): a search probe (or a full-schedule run)."""
    setup = ctx.setup

    def run(factor: float):
        data = ctx.probe_data if probe else ctx.data
        try:
            model, info = lm.build_row_model(
                name,
                ctx.dense,
                data,
                ctx.arch,
                factor,
                align=align,
                epochs=setup.epochs,
                probe=probe,
            )
        except InputError:
            raise  # a wrong option is a bug of the harness, not a point of the curve
        except CompressorError as exc:
            print(f"  {name} at {factor:.3g}x FLOPs failed: {first_line(exc)}", flush=True)
            return None, None
        batches = (batch,) if probe else setup.batches_timed
        result = measured(ctx, model, batches, setup.probe_rounds if probe else setup.rounds)
        speedup = result["speedup"][str(batch)]
        print(
            f"  {name} {'probe' if probe else 'run'} {factor:.3g}x FLOPs: {speedup:.2f}x",
            flush=True,
        )
        return speedup, (model, info, result)

    return run


def main_cell(ctx: Context, name: str, target: float, batch: int, align: int | None) -> dict:
    """One row: `name` at measured speed-up `target` at `batch`."""
    setup, method = ctx.setup, lm.OURS.get(name, ("tp",))[0]
    row = {"model": ctx.arch, "target": f"{target:g}x", "batch": batch, "method": name}
    row["round_to"] = "n/a" if align is None else align
    align = align or 1
    found = None
    # the toolkit checks a latency budget at batch 1 (latency_check.CHECKED_BATCH): a target
    # at another batch is searched, or the row would be the batch-1 row timed at 32
    if name != lm.TP and lm.takes_latency(method) and str(batch) == CHECKED_BATCH:
        try:
            model, info = lm.build_latency_model(
                name, ctx.dense, ctx.data, target, align=align, epochs=setup.epochs,
                measure=graph_measurer(ctx.example, threads=1, batches=(batch,)),
            )  # fmt: skip
            result = measured(ctx, model, setup.batches_timed, setup.rounds)
            found = {"path": "latency metric", "probes": 0, "runs": 1 + info["refits"]}
        except CompressorError as exc:  # the toolkit's own check missed: say so, then search
            print(f"  {name} latency metric failed: {first_line(exc)}", flush=True)
            row["latency_error"] = first_line(exc)
    if found is None:
        cheap = search_factor(
            probe_for(ctx, name, batch, align, probe=True),
            target,
            tolerance=setup.probe_tolerance,
            steps=setup.probe_steps,
        )
        full = search_factor(
            probe_for(ctx, name, batch, align, probe=False),
            target,
            tolerance=setup.tolerance,
            steps=setup.final_steps,
            first=cheap.factor,
        )
        if full.payload is None:
            return row | {"path": "FLOP search", "met": False, "error": "every run failed"}
        model, info, result = full.payload
        path = "latency metric failed; FLOP search" if "latency_error" in row else "FLOP search"
        found = {"path": path, "probes": len(cheap.probes), "runs": len(full.probes)}
    speedup = result["speedup"][str(batch)]
    row |= found | {"met": abs(speedup / target - 1) <= setup.tolerance}
    return row | describe(ctx, model, result) | info


def describe(ctx: Context, model, result: dict) -> dict:
    """Top-1, latency, speed-up, FLOPs, params and live channels of a finished model."""
    stats, dense = measure(model, ctx.example), measure(ctx.dense, ctx.example)
    row = {"top-1 %": round(100 * evaluate(model.eval(), ctx.data.test), 2)}
    for b, ms in result["timed"]["model"].items():
        row[f"ms b{b}"] = round(ms, 3)
        row[f"dense ms b{b}"] = round(result["timed"]["dense"][b], 3)
        row[f"speed-up b{b}"] = round(result["speedup"][b], 3)
    row |= {"FLOPs x": round(dense.flops / stats.flops, 3), "MFLOPs": round(stats.flops / 1e6, 3)}
    row["params"] = stats.params
    row["channels"] = {r.fqn: r.channels for r in stats.layers if r.kind == "Conv2d"}
    return row


def align_cell(ctx: Context, name: str, flop_factor: float, align: int | None) -> dict:
    """The alignment table: `name` at a fixed FLOP cut (probe schedule: structure only)."""
    row = {"model": ctx.arch, "method": name, "FLOPs request": f"{flop_factor:g}x"}
    row["round_to"] = "n/a" if align is None else align
    if align is None:
        return row
    build = lm.build_row_model
    dense_flops = measure(ctx.dense, ctx.example).flops

    def flop_probe(factor: float):  # Torch-Pruning's ratio has no FLOP target: search it
        model, _ = build(name, ctx.dense, ctx.probe_data, ctx.arch, factor, align=align,
                         epochs=0, probe=True)  # fmt: skip
        return dense_flops / measure(model, ctx.example).flops, model

    if name == lm.TP:
        model = search_factor(flop_probe, flop_factor, tolerance=0.02, steps=10).payload
    else:
        model = flop_probe(flop_factor)[1]
    result = measured(ctx, model, ctx.setup.batches_timed, ctx.setup.rounds)
    row |= describe(ctx, model, result)
    for b in ctx.setup.batches_timed:
        row[f"% of FLOP cut b{b}"] = round(100 * row[f"speed-up b{b}"] / row["FLOPs x"], 1)
    row.pop("top-1 %")  # structure only: the probe schedule's accuracy means nothing
    return row


def context(setup: Setup, arch: str) -> Context:
    dense, data = dense_baseline(arch, SPEC, epochs=setup.dense_epochs, limit=setup.limit)
    probe_data = load_data(SPEC, limit=setup.probe_limit)
    example = (data.sample_inputs(2),)
    return Context(setup, arch, dense.eval(), data, probe_data, OrtTimer(example), example)


def dense_cell(ctx: Context) -> dict:
    """The dense model's row: top-1, FLOPs, params (its latency is in every other row)."""
    stats = measure(ctx.dense, ctx.example)
    row = {"model": ctx.arch, "method": "dense", "params": stats.params}
    row["top-1 %"] = round(100 * evaluate(ctx.dense, ctx.data.test), 2)
    return row | {"FLOPs x": 1.0, "MFLOPs": round(stats.flops / 1e6, 3)}


def cells(setup: Setup):
    """(key, arch, kind, args) of every cell, in the order they run."""
    for arch in setup.archs:
        yield f"{arch}/dense", arch, "dense", ()
        for target in setup.targets:
            for batch in setup.batches:
                for name in setup.methods:
                    align = lm.align_of(name, lm.ALIGN)
                    key = f"{arch}/{name}/{target:g}x/b{batch}"
                    yield key, arch, "main", (name, target, batch, align)
        for factor in setup.flop_factors:
            for name in setup.methods:
                for align in (1, lm.ALIGN):
                    key = f"align/{arch}/{name}/{factor:g}xFLOPs/a{align}"
                    yield key, arch, "align", (name, factor, lm.align_of(name, align))


def run(setup: Setup, store: CellStore, make_context=context) -> list[dict]:
    """Every cell's row; finished cells come from `store`, the others are computed."""
    if lm.TP in setup.methods:
        lm.require_torch_pruning()
    contexts: dict[str, Context] = {}
    rows = []
    for key, arch, kind, args in cells(setup):

        def compute(arch=arch, kind=kind, args=args) -> dict:
            if arch not in contexts:
                contexts[arch] = make_context(setup, arch)
                check_dense(arch, contexts[arch], store)
            start = time.perf_counter()
            cell = {"dense": dense_cell, "main": main_cell, "align": align_cell}[kind]
            row = cell(contexts[arch], *args)
            return row | {"kind": kind, "cell s": round(time.perf_counter() - start)}

        rows.append(store.run(key, compute) | {"key": key})
        print(f"{key}: done", flush=True)
    return rows


def check_dense(arch: str, ctx: Context, store: CellStore) -> None:
    """Refuses to add cells of a dense model other than the one the stored cells pruned."""
    stored_row = store.cells.get(f"{arch}/dense")
    if stored_row is None:
        return
    now = dense_cell(ctx)
    if (now["top-1 %"], now["params"]) != (stored_row["top-1 %"], stored_row["params"]):
        raise CompressorError(
            f"{store.path} holds {arch} cells pruned from a dense model of top-1 "
            f"{stored_row['top-1 %']} % ({stored_row['params']} params); the one trained now "
            f"has {now['top-1 %']} % ({now['params']}). Delete the file's {arch} cells "
            "to run them all again from this one"
        )


def stored(setup: Setup, store: CellStore) -> list[dict]:
    """The finished cells of `setup`'s archs and methods, in the order a run makes them."""
    return [store.cells[key] | {"key": key} for key, *_ in cells(setup) if key in store.cells]


def settings_of(setup: Setup) -> dict:
    """The settings a cell's values depend on; archs, targets, batches and methods only
    choose which cells run, so a run with fewer or more of them reuses the same file."""
    chosen = ("archs", "targets", "batches", "methods", "flop_factors")
    return {k: v for k, v in dataclasses.asdict(setup).items() if k not in chosen}


def _parsed(kind: type, item: str):
    """`item` as a `kind` (float targets, int batches), or as given when it is not one."""
    try:
        return kind(item)
    except ValueError:
        return item


def narrowed(setup: Setup, **subsets: str | None) -> Setup:
    """`setup` with comma-separated choices of its archs / methods / targets / batches from
    the full benchmark's (the rest keep `setup`'s): a reduced run can take the full grid."""
    for field, given in subsets.items():
        if given:
            allowed = getattr(Setup, field)
            kind = type(allowed[0])
            chosen = tuple(_parsed(kind, item) for item in given.split(","))
            unknown = sorted(map(str, set(chosen) - set(allowed)))
            if unknown:
                choices = ",".join(f"{a:g}" if kind is float else str(a) for a in allowed)
                raise InputError(f"unknown {field} {unknown}; choose from {choices}")
            setup = dataclasses.replace(setup, **{field: chosen})
    return setup


def main() -> None:
    from bench import latency_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (ResNet-20, 2x, b32)")
    parser.add_argument("--reduced", action="store_true", help="ResNet-20, 2x/4x, b1 (REDUCED)")
    parser.add_argument("--report-only", action="store_true", help="tables from the checkpoint")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(lm.METHODS)}")
    parser.add_argument("--archs", help=f"comma-separated subset of {','.join(Setup.archs)}")
    parser.add_argument("--targets", help="comma-separated subset of 2,3,4 (speed-ups)")
    parser.add_argument("--batches", help="comma-separated subset of 1,32 (targets' batch)")
    parser.add_argument("--section", default="", help="RESULTS.md section (default latency)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: more threads only contend
    try:
        base = QUICK if args.quick else REDUCED if args.reduced else Setup()
        setup = narrowed(
            base,
            archs=args.archs,
            methods=args.methods,
            targets=args.targets,
            batches=args.batches,
        )
    except InputError as exc:
        parser.error(str(exc))  # exit 2: bad usage
    try:
        suffix = "-quick" if args.quick else "-reduced" if args.reduced else ""
        folder = OUT if args.quick else CHECKPOINTS
        store = CellStore(folder / f"latency{suffix}.json", settings_of(setup))
        if args.report_only and not store.cells:
            raise CompressorError(
                f"{store.path} holds no finished cells; run without --report-only"
            )
        rows = stored(setup, store) if args.report_only else run(setup, store)
    except CompressorError as exc:  # Torch-Pruning missing, a checkpoint of other settings
        raise SystemExit(f"Error: {exc}") from None
    flag = " --quick" if args.quick else " --reduced" if args.reduced else ""
    given = [(k, getattr(args, k)) for k in ("archs", "methods", "targets", "batches")]
    given.append(("section", args.section))
    flag += "".join(f" --{k} {v}" for k, v in given if v)
    load = machine(load=not args.report_only)
    latency_report.write(
        rows, setup, quick=args.quick, machine=load, flag=flag, section=args.section
    )


if __name__ == "__main__":
    main()
