"""BAR against magnitude channel pruning and Torch-Pruning at volume budgets 2/4/8/16x.

    .venv/bin/python -m bench.bar                 # the whole run (~45 min on 2 shared cores)
    .venv/bin/python -m bench.bar --report-only   # rewrite RESULTS.md from bench/out/bar.json

ResNet-20 (width 1, projection shortcuts) on Fashion-MNIST: a dense model trained on a
training subset (sizes below), then, per volume budget, four compressed models, each trained
as long as the others in all:

* BAR-mixed / BAR-tied: `compress prune --method bar --residual mixed|tied`: phase 1 with
  gates (`BAR_EPOCHS`), then the slimmed net trains `FT_EPOCHS` (the last fifth at lr / 10).
* channel-magnitude: L1 filter norms, one keep ratio for every layer (mixed residual
  streams, as BAR-mixed), the same budget step, then `BAR_EPOCHS + FT_EPOCHS` of training.
* Torch-Pruning: its MagnitudePruner (L1, DepGraph, tied residual streams) with a uniform
  pruning ratio found by bisection on the measured volume, then the same training.

All four distil from the dense model (T 4, alpha 0.9) with the same SGD. Top-1 is on the
full 10k test set; latency is onnxruntime on the slimmed ONNX graphs (one thread, all
models alternating every round, medians).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from bench.common import OUT, dense_baseline, machine, markdown_table, write_json, write_section
from compressor import zoo
from compressor.budget import Budget
from compressor.distill import train_loader
from compressor.methods import prune
from compressor.methods.bar import BarConfig
from compressor.methods.bar.slim import slimmed_finetune_phase
from compressor.methods.phases import train
from compressor.stats import measure
from compressor.train import Distill, evaluate

ARCH, WIDTH, SPEC = "resnet20", 1.0, "fashion-mnist"
LIMIT = 5000  # training images (a random subset); the test set is the full 10k
DENSE_EPOCHS = 10
BAR_EPOCHS, FT_EPOCHS = 3, 2  # paper 80 / 40 + 10, scaled to what 2 shared cores allow
BATCH = 32  # every method: twice the gate updates of batch 64 at the same cost in images
FACTORS = (2, 4, 8, 16)
METHODS = ("BAR-mixed", "BAR-tied", "channel-magnitude", "Torch-Pruning")
ROUNDS = 15
COMMAND = ".venv/bin/python -m bench.bar"


def run_method(name: str, dense: torch.nn.Module, data, factor: int):
    """(slimmed model, report) for one method at one volume budget."""
    budget = Budget("volume", 1 / factor)
    if name.startswith("BAR"):
        residual = name.split("-")[1]
        options = {"epochs": BAR_EPOCHS, "finetune_epochs": FT_EPOCHS, "residual": residual}
        options["batch_size"] = BATCH
        result = prune(dense, "bar", budget, data, **options)
        return result.model, result.report
    if name == "channel-magnitude":
        epochs = BAR_EPOCHS + FT_EPOCHS
        result = prune(
            dense, "channel-magnitude", budget, data, finetune_epochs=epochs, batch_size=BATCH
        )
        return result.model, result.report
    return torch_pruning(dense, data, budget)


def _rebuild(dense: torch.nn.Module, shape) -> torch.nn.Module:
    """A plain zoo ResNet with the dense weights (Torch-Pruning traces eager modules)."""
    model = zoo.build(ARCH, in_channels=shape[0], input_size=tuple(shape[1:]), width=WIDTH)
    model.load_state_dict(dense.state_dict())
    return model.eval()


def tp_prune(dense, shape, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = _rebuild(dense, shape)
    example = torch.zeros(1, *shape)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
    )
    pruner.step()
    return model.eval()


def torch_pruning(dense, data, budget: Budget):
    """Torch-Pruning at the uniform ratio whose volume is closest to the budget, then the
    same training. Above 1 - 1/16 it leaves 16-channel layers whole (its volume jumps back
    up), so the ratio is searched below that; bisection finds the ratios around the target."""
    shape = data.input_shape
    example = torch.zeros(1, *shape)
    dense_volume = measure(dense, example).volume

    def volume(ratio: float) -> float:
        return measure(tp_prune(dense, shape, ratio), example).volume

    low, high = 0.0, 1.0 - 1.0 / 16  # volume(low) > target >= volume(high), if reachable
    for _ in range(12):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if volume(mid) <= budget.keep * dense_volume else (mid, high)
    target = budget.keep * dense_volume
    high = min((low, high), key=lambda r: abs(np.log(volume(r) / target)))
    start = time.perf_counter()
    model = tp_prune(dense, shape, high)
    loader = train_loader(data, BATCH)
    teacher = copy.deepcopy(dense).eval()
    # BAR's own phases 2-3 recipe: BN re-estimated (100 batches), lr 0.01, momentum 0.9,
    # wd 5e-4, the last 20 % at lr / 10
    cfg = BarConfig(finetune_epochs=BAR_EPOCHS + FT_EPOCHS)
    train(slimmed_finetune_phase(model, loader, cfg, Distill(teacher)))
    stats = measure(model, example)
    report = {
        "achieved": {"keep": stats.volume / dense_volume, "pruning_ratio": high},
        "seconds": time.perf_counter() - start,
    }
    return model.eval(), report


# --- latency ---------------------------------------------------------------------------------


def export(model: torch.nn.Module, name: str, shape) -> str:
    from exporters.onnx import export_onnx

    path = OUT / f"bar-{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx(model, path, (torch.randn(2, *shape),))
    return str(path)


def session_for(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, str], batch: int, shape) -> dict[str, float]:
    """Median ms per forward; every model runs once per round, the order rotating."""
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    sessions = {name: session_for(path) for name, path in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    inner = 10 if batch == 1 else 1  # amortise timer noise on sub-millisecond runs
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for name in names:
        sessions[name].run(None, feeds[name])
    for round_ in range(ROUNDS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- the run ---------------------------------------------------------------------------------


def run() -> dict:
    torch.set_num_threads(1)  # a 2-core machine shared with other jobs: threads only contend
    start = time.perf_counter()
    dense, data = dense_baseline(ARCH, SPEC, epochs=DENSE_EPOCHS, limit=LIMIT, width=WIDTH)
    shape = data.input_shape
    example = torch.zeros(1, *shape)
    dense_stats = measure(dense, example)
    rows = [_row("dense", 1, dense, dense_stats, dense_stats, data, 0.0)]
    models, channels = {"dense": dense}, {"dense": _channels(dense, example)}
    for factor in FACTORS:
        for name in METHODS:
            start = time.perf_counter()
            model, report = run_method(name, dense, data, factor)
            seconds = time.perf_counter() - start
            stats = measure(model, example)
            rows.append(_row(name, factor, model, stats, dense_stats, data, seconds, report))
            models[f"{name} {factor}x"] = model
            channels[f"{name} {factor}x"] = _channels(model, example)
            print(markdown_table(rows[-1:], list(rows[-1])), flush=True)
    paths = {key: export(model, key.replace(" ", "-"), shape) for key, model in models.items()}
    timed = {batch: latencies(paths, batch, shape) for batch in (1, 32)}
    for row in rows:
        key = "dense" if row["method"] == "dense" else f"{row['method']} {row['budget']}"
        row["ms b1"], row["ms b32"] = round(timed[1][key], 3), round(timed[32][key], 2)
    minutes = round((time.perf_counter() - start) / 60)
    return {"machine": machine(), "command": COMMAND, "rows": rows, "channels": channels} | {
        "minutes": minutes
    }


def _row(name, factor, model, stats, dense, data, seconds, report=None) -> dict:
    top1 = evaluate(model.eval(), data.test)
    row = {
        "budget": "dense" if name == "dense" else f"{factor}x",
        "method": name,
        "top-1 %": round(100 * top1, 2),
        "volume x": round(dense.volume / stats.volume, 2),
        "FLOPs x": round(dense.flops / stats.flops, 2),
        "params": stats.params,
        "train s": round(seconds),
    }
    if report is not None and "budget_step" in report:
        step = report["budget_step"]
        row["budget step"] = f"-{step['removed']}/+{step['restored']}"
    row["MFLOPs"] = round(stats.flops / 1e6, 3)
    if report is not None and report.get("residual") == "mixed":
        tied = report["tied_equivalent"]  # BAR-mixed's own decision built with tied streams
        row["same gates tied: volume x"] = round(dense.volume / tied["volume"], 2)
        row["same gates tied: MFLOPs"] = round(tied["flops"] / 1e6, 3)
    return row


def _channels(model: torch.nn.Module, example) -> dict[str, int]:
    return {r.fqn: r.channels for r in measure(model, example).layers if r.kind == "Conv2d"}


# --- the report --------------------------------------------------------------------------------


def plot(channels: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(channels["dense"])
    fig, ax = plt.subplots(figsize=(11, 4))
    styles = {
        "dense": ("k", "-"),
        "BAR-mixed 4x": ("tab:blue", "-"),
        "BAR-mixed 16x": ("tab:blue", "--"),
        "channel-magnitude 4x": ("tab:orange", "-"),
        "channel-magnitude 16x": ("tab:orange", "--"),
    }
    for key, (color, line) in styles.items():
        if key in channels:
            counts = [channels[key].get(fqn, 0) for fqn in layers]
            ax.plot(range(len(layers)), counts, line, color=color, marker="o", ms=3, label=key)
    ax.set_xticks(range(len(layers)), layers, rotation=75, fontsize=7)
    ax.set_ylabel("live output channels")
    ax.set_yscale("log", base=2)
    ax.set_title("ResNet-20 on Fashion-MNIST: channels kept per conv at volume budgets")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = OUT.parent / "bar_channels.png"
    fig.savefig(path, dpi=110)
    return path.name


def section(payload: dict) -> str:
    rows = payload["rows"]
    columns = ["budget", "method", "top-1 %", "volume x", "FLOPs x", "params"]
    columns += ["ms b1", "ms b32", "train s", "budget step"]
    image = plot(payload["channels"])
    return "\n".join(
        [
            "## BAR: budget-aware channel pruning (ResNet-20, Fashion-MNIST, volume budgets)",
            "",
            f"`{payload['command']}` on {payload['machine']}; a 2-core machine shared with",
            f"other jobs ({payload.get('minutes', '?')} min in all). ResNet-20 width {WIDTH} trained {DENSE_EPOCHS} epochs on a",
            f"{LIMIT}-image training subset; top-1 on the full 10k test set. BAR:",
            f"{BAR_EPOCHS} epochs with gates, then {FT_EPOCHS} epochs slimmed (last fifth at",
            f"lr/10); the baselines train {BAR_EPOCHS + FT_EPOCHS} epochs after pruning; all",
            f"use batch {BATCH}, SGD lr 0.01, and distil from the dense model. *volume x* /",
            "*FLOPs x*: dense / slimmed activation volume and MACs per image. Latency: onnxruntime, 1 thread, medians over",
            f"{ROUNDS} alternating rounds. *budget step*: channels the final step removed /",
            "restored after the gates (BAR; magnitude pruning starts from a uniform ratio).",
            "",
            markdown_table(rows, columns),
            "",
            *mixed_vs_tied(rows),
            "",
            f"![live channels per layer]({image})",
            "",
            "Live output channels per conv, dense vs 4x vs 16x (BAR-mixed and",
            "channel-magnitude).",
            "",
            *reading(rows),
        ]
    )


def reading(rows: list[dict]) -> list[str]:
    """The goals of issue 7, checked against the rows."""
    top1 = {(r["budget"], r["method"]): r["top-1 %"] for r in rows}
    dense = top1[("dense", "dense")]

    def gap(factor: int, other: str) -> float:
        return top1[(f"{factor}x", "BAR-mixed")] - top1[(f"{factor}x", other)]

    return [
        "Goals (issue 7), measured: BAR-mixed at 4x loses "
        f"{dense - top1[('4x', 'BAR-mixed')]:.2f} points of dense top-1 (goal <= 1); "
        f"against channel-magnitude it is {gap(8, 'channel-magnitude'):+.2f} points at 8x and "
        f"{gap(16, 'channel-magnitude'):+.2f} at 16x (goal >= +2); against BAR-tied "
        f"{gap(16, 'BAR-tied'):+.2f} and Torch-Pruning {gap(16, 'Torch-Pruning'):+.2f} at 16x.",
        "",
        "Why BAR misses here: a volume budget prices a channel by its feature-map area, and",
        "this ResNet-20 keeps 57 % of its volume in 16-channel 28x28 layers, so one stage-1",
        "channel costs as much as 16 stage-3 channels. With a few hundred gate updates (3",
        "epochs of 5k images, against about 60k updates in the paper's 80 CIFAR epochs) the",
        "gates' task gradient cannot hold that price: BAR keeps stage 3 whole and cuts every",
        "stage-1 layer to 1-2 channels (plot), where a uniform ratio keeps 4. The paper's",
        "wide networks have room for that trade at full resolution; 16 channels have not. The same equal-volume networks then differ in FLOPs: BAR's keep",
        "the FLOP-heavy last stage, so *mixed vs tied (trained)* compares different",
        "allocations, not block styles. Built from the same gates (*same gates*), mixed",
        "streams meet the volume budget that tied streams miss by far (tied: 2.7x instead",
        "of 4x) and save FLOPs as well. At 16x mixed blocks decide: BAR-mixed and",
        "magnitude (mixed) keep 76 %, BAR-tied and Torch-Pruning (tied) fall to 61-63 %.",
        "",
        "Latency: onnxruntime runs the mixed joins (index_add, exported as ScatterND) slowly;",
        "at equal FLOPs the tied graphs (BAR-tied, Torch-Pruning) run faster, and mixed",
        "graphs gain less time than their FLOP factor suggests.",
    ]


def mixed_vs_tied(rows: list[dict]) -> list[str]:
    """Lines comparing BAR-mixed's FLOPs with tied streams, two ways, per budget."""
    lines = [
        "Mixed vs tied residual streams (BAR). *trained*: BAR-tied trained to the same volume",
        "budget; *same gates*: BAR-mixed's own decision built with tied streams (every",
        "producer of a stream keeps the union of the stream's channels; supplement §5).",
        "",
        "| budget | MFLOPs mixed | MFLOPs tied (trained) | fewer FLOPs | "
        "MFLOPs tied (same gates) | volume x tied (same gates) | fewer FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["budget"], r["method"]): r for r in rows}
    for factor in FACTORS:
        mixed, tied = (
            by_key.get((f"{factor}x", "BAR-mixed")),
            by_key.get((f"{factor}x", "BAR-tied")),
        )
        if mixed is None or tied is None:
            continue
        same = mixed["same gates tied: MFLOPs"]
        lines.append(
            f"| {factor}x | {mixed['MFLOPs']} | {tied['MFLOPs']} | "
            f"{100 * (1 - mixed['MFLOPs'] / tied['MFLOPs']):.0f} % | {same} | "
            f"{mixed['same gates tied: volume x']} | {100 * (1 - mixed['MFLOPs'] / same):.0f} % |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    args = parser.parse_args()
    if args.quick:
        global LIMIT, DENSE_EPOCHS, BAR_EPOCHS, FT_EPOCHS, FACTORS, ROUNDS
        LIMIT, DENSE_EPOCHS, BAR_EPOCHS, FT_EPOCHS, FACTORS, ROUNDS = 256, 1, 1, 1, (4, 16), 2
        payload = run()
        print(markdown_table(payload["rows"], list(payload["rows"][-1])))
        print(section(payload))
        return
    if args.report_only:
        payload = json.loads((OUT / "bar.json").read_text())
    else:
        payload = run()
        write_json("bar", payload)
    print(markdown_table(payload["rows"], list(payload["rows"][-1])))
    write_section("bar", section(payload))


if __name__ == "__main__":
    main()
