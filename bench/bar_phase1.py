"""BAR's phase 1 with the weights' gradients skipped (today) or computed and discarded at
lr 0 (before), on ResNet-20: seconds per run, and whether the two give the same network.

    .venv/bin/python -m bench.bar_phase1 [--rounds 5] [--limit 2000] [--epochs 2]   # ~4 min

Each round prunes the same model both ways (which runs first alternates), BAR tied at 2x
FLOPs, `epochs` gate epochs and no fine-tuning on Fashion-MNIST's first `limit` training images, one
torch thread; the seconds are prune()'s whole run (teacher forward, decision, BatchNorm
re-estimation included). Weights are random: the time does not depend on them. Writes the
RESULTS.md section bar_phase1.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import compressor.methods.bar as bar_module
from bench.common import machine, markdown_table, write_section
from compressor import zoo
from compressor.data import load_data
from compressor.methods import prune

WAYS = {
    "no weight gradients (today)": bar_module.fixed_weights,
    "gradients at lr 0 (before)": lambda model, fixed: contextlib.nullcontext(),
}
OPTIONS = {"finetune_epochs": 0, "residual": "tied"}


def timed(model, data, way: str, epochs: int):
    """(seconds, result) of one prune() with phase 1 run `way`."""
    bar_module.fixed_weights = WAYS[way]
    try:
        start = time.perf_counter()
        result = prune(model, "bar", "2x", data, epochs=epochs, **OPTIONS)
        return time.perf_counter() - start, result
    finally:
        bar_module.fixed_weights = WAYS["no weight gradients (today)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="gate epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("fashion-mnist", limit=args.limit)
    model = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=28)
    seconds = {way: [] for way in WAYS}
    same = True
    for round_ in range(args.rounds):
        ways = list(WAYS)[::-1] if round_ % 2 else list(WAYS)
        results = {}
        for way in ways:
            spent, results[way] = timed(model, data, way, args.epochs)
            seconds[way].append(spent)
            print(f"round {round_}: {way} {spent:.1f} s", flush=True)
        a, b = (results[w].model.state_dict() for w in WAYS)
        same &= all(torch.equal(a[k], b[k]) for k in a)
    base = statistics.median(seconds["gradients at lr 0 (before)"])
    rows = [
        {
            "phase 1": way,
            "median s": round(statistics.median(s), 2),
            "runs": " / ".join(f"{x:.1f}" for x in s),
            "time / before": round(statistics.median(s) / base, 3),
        }
        for way, s in seconds.items()
    ]
    table = markdown_table(rows, list(rows[0]))
    print(table)
    write_section(
        "bar_phase1",
        "## BAR's phase 1: weight gradients skipped or computed at lr 0 (ResNet-20)\n\n"
        f"`.venv/bin/python -m bench.bar_phase1 --rounds {args.rounds} --limit {args.limit} "
        f"--epochs {args.epochs}` on {machine()}; BAR tied at 2x FLOPs, {args.epochs} gate "
        "epochs, no fine-tuning, "
        f"{args.limit} Fashion-MNIST training images, 1 torch thread, the order alternating "
        "by round; seconds of the whole prune().\n\n"
        f"{table}\n\nThe two ways gave the same network, bit for bit, in every round: {same}.\n",
    )


if __name__ == "__main__":
    main()
