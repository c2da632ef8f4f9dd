"""Where BAR's accuracy goes at a short schedule: BAR-tied against Torch-Pruning and
channel-magnitude at one FLOP cut, with the schedule's parts varied.

    .venv/bin/python -m bench.bar_short [--seeds 0,1] [--variants a,b] [--set name=value]
    # ~40 s a run, 2 min at 8 epochs, on an idle 2-core machine

ResNet-20 on Fashion-MNIST (5k training images, the dense model of `bench.latency
--reduced`), every row pruned to the same FLOP cut (3.68x, what BAR-tied took at the 2x
latency budget there) at round_to 8 and trained 3 epochs after pruning starts, as in that
benchmark (8 in the longer rows). Rows vary BAR's split between gate epochs and fine-tuning
epochs and whether the weights train while the gates learn (`freeze_weights`); a "+0" row
is the network right after the decision (BatchNorm re-estimated, no fine-tuning); `--set`
changes one BAR option on every BAR row (e.g. fold_gates=true). Writes the RESULTS.md
section bar_short (or `--section`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import latency_methods as lm
from bench.common import dense_baseline, machine, markdown_table, write_section
from cli.prune_steps import parse_settings
from compressor.budget import Budget
from compressor.methods import get_method
from compressor.stats import measure
from compressor.train import evaluate

FACTOR = 3.68
ALIGN = 8
# name -> (method row, options); BAR's "joint" rows train the weights with the gates in
# phase 1 (the paper; freeze_weights=False), its other rows keep them fixed (our default)
JOINT = {"freeze_weights": False}
VARIANTS = {
    "magnitude 0+3": ("channel-magnitude", {"finetune_epochs": 3}),
    "magnitude 0+2": ("channel-magnitude", {"finetune_epochs": 2}),
    "magnitude 0+0": ("channel-magnitude", {"finetune_epochs": 0}),
    "tp 0+3": (lm.TP, {"finetune_epochs": 3}),
    "tp 0+2": (lm.TP, {"finetune_epochs": 2}),
    "tp 0+0": (lm.TP, {"finetune_epochs": 0}),
    "bar joint 2+1": ("BAR-tied", {"epochs": 2, "finetune_epochs": 1} | JOINT),
    "bar 2+1": ("BAR-tied", {"epochs": 2, "finetune_epochs": 1}),
    "bar joint 2+0": ("BAR-tied", {"epochs": 2, "finetune_epochs": 0} | JOINT),
    "bar joint 1+2": ("BAR-tied", {"epochs": 1, "finetune_epochs": 2} | JOINT),
    "bar 1+2": ("BAR-tied", {"epochs": 1, "finetune_epochs": 2}),
    "bar 1+0": ("BAR-tied", {"epochs": 1, "finetune_epochs": 0}),
    # BAR's default residual mode: does fixing the weights pay there too?
    "bar-mixed joint 2+1": ("BAR-mixed", {"epochs": 2, "finetune_epochs": 1} | JOINT),
    "bar-mixed 2+1": ("BAR-mixed", {"epochs": 2, "finetune_epochs": 1}),
    "bar-mixed joint 1+2": ("BAR-mixed", {"epochs": 1, "finetune_epochs": 2} | JOINT),
    "bar-mixed 1+2": ("BAR-mixed", {"epochs": 1, "finetune_epochs": 2}),
    # a longer schedule: does BAR's gate phase pay once it has time? (the mixed rows are
    # left out of the default run for time: --variants names them)
    "magnitude 0+8": ("channel-magnitude", {"finetune_epochs": 8}),
    "tp 0+8": (lm.TP, {"finetune_epochs": 8}),
    "bar joint 4+4": ("BAR-tied", {"epochs": 4, "finetune_epochs": 4} | JOINT),
    "bar 4+4": ("BAR-tied", {"epochs": 4, "finetune_epochs": 4}),
    "bar-mixed joint 4+4": ("BAR-mixed", {"epochs": 4, "finetune_epochs": 4} | JOINT),
    "bar-mixed 4+4": ("BAR-mixed", {"epochs": 4, "finetune_epochs": 4}),
}
DEFAULT = [name for name in VARIANTS if not name.startswith("bar-mixed") or "4+4" not in name]


def widths(model: torch.nn.Module) -> str:
    """ResNet-20's live channels: the inner (first) conv of each of its 9 blocks, then each
    stage's residual stream (tied: one width per stage, read from its first block)."""
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    ]
    inner = [c.out_channels for c in convs[1::2]]
    stream = [c.out_channels for c in convs[2::2]][::3]
    return f"inner {' '.join(map(str, inner))}; stream {' '.join(map(str, stream))}"


def build(name: str, dense, data, seed: int, settings: dict) -> torch.nn.Module:
    """Row `name`'s pruned, fine-tuned model; `settings` (--set) go to every BAR row."""
    row, options = VARIANTS[name]
    torch.manual_seed(seed)
    if row == lm.TP:
        model = lm.prune_tp(dense, "resnet20", data.input_shape, FACTOR, ALIGN)
        if options["finetune_epochs"]:
            lm.finetune_tp_(model, dense, data, options["finetune_epochs"])
        return model.eval()
    fixed = {"residual": "tied"} if row == "channel-magnitude" else {}
    options = options | fixed | {"round_to": ALIGN} | (settings if row.startswith("BAR") else {})
    if row == "channel-magnitude" and not options["finetune_epochs"]:
        options["bn_batches"] = 100
    result = lm.prune_ours(row, dense, data, Budget("flops", 1 / FACTOR), options, seed=seed)
    print("  ", result.report.get("budget_step", {}).get("note", ""), flush=True)
    return result.model


def command(args) -> str:
    """The arguments that made a section, the defaults left out."""
    line = f"--seeds {args.seeds}"
    if args.variants != ",".join(DEFAULT):
        line += f' --variants "{args.variants}"'
    line += "".join(f" --set {item}" for item in args.set)
    return line + ("" if args.section == "bar_short" else f" --section {args.section}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(DEFAULT))
    parser.add_argument("--section", default="bar_short", help="RESULTS.md section to write")
    parser.add_argument(
        "--set", action="append", default=[], help="name=value for every BAR row's config"
    )
    args = parser.parse_args()
    settings = parse_settings(tuple(args.set), get_method("bar"))
    torch.set_num_threads(2)
    dense, data = dense_baseline("resnet20", "fashion-mnist", epochs=8, limit=5000)
    dense.eval()
    x = data.sample_inputs(1)
    dense_flops = measure(dense, x).flops
    top = round(100 * evaluate(dense, data.test), 2)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows = []
    for name in args.variants.split(","):
        accs, flops, shapes = [], [], []
        start = time.perf_counter()
        # channel-magnitude and Torch-Pruning do not draw on the seed: one run says it all
        for seed in seeds if VARIANTS[name][0].startswith("BAR") else seeds[:1]:
            model = build(name, dense, data, seed, settings)
            accs.append(100 * evaluate(model, data.test))
            flops.append(dense_flops / measure(model, x).flops)
            shapes.append(widths(model))
            print(name, seed, round(accs[-1], 2), round(flops[-1], 2), shapes[-1], flush=True)
        row = {"row": name, "top-1 %": round(statistics.median(accs), 2)}
        row |= {"runs": " / ".join(f"{a:.2f}" for a in accs)}
        row |= {"FLOPs x": round(statistics.median(flops), 2)}
        row |= {"widths, first seed": shapes[0]}
        rows.append(row | {"s per run": round((time.perf_counter() - start) / len(accs))})
    table = markdown_table(rows, list(rows[0]))
    print(table)
    write_section(
        args.section,
        "## Where BAR's accuracy goes at a short schedule (ResNet-20, Fashion-MNIST)\n\n"
        f"`.venv/bin/python -m bench.bar_short {command(args)}` on {machine()}; dense "
        f"top-1 {top} % (8 epochs, 5k training images); every row asks for "
        f"{FACTOR}x FLOPs (Torch-Pruning: its uniform ratio for it, which cuts more), round_to "
        f"{ALIGN}, tied channels (*bar-mixed*: BAR's default mixed residual streams, whose "
        "*stream* width is the stage's first block's output); *a+b*: gate (or pruning) "
        "epochs + fine-tuning epochs; BAR's "
        "*joint* rows train the weights with the gates in phase 1 (the paper, "
        "`freeze_weights=False`), its other rows keep them fixed (the default); *widths*: "
        "live channels of each block's inner conv, then each stage's residual stream; top-1 "
        "on the full 10k test set, median over seeds (channel-magnitude and Torch-Pruning do "
        "not draw on the seed, their runs repeat to the digit: one run each).\n\n" + table + "\n",
    )


if __name__ == "__main__":
    main()
