"""BAR's phase 1 with the weights fixed (the default, `freeze_weights`) or trained with the
gates (the paper), on LeNet-5 / digits: a model 2 epochs into training and one trained 10.

    .venv/bin/python -m bench.bar_freeze [--seeds 0,1]   # ~5 min on 2 cores

Each cell prunes the same dense model to a FLOP budget with BAR (mixed, its defaults but the
schedule: gate epochs + fine-tuning epochs), once per seed and way; top-1 on digits' test
split (360 images: one image is 0.28 points). Writes the RESULTS.md section bar_freeze;
bench.bar_short holds the ResNet-20 side.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import dense_baseline, machine, markdown_table, write_section
from compressor.budget import Budget
from compressor.methods import prune
from compressor.train import evaluate

DENSE_EPOCHS = (2, 10)
FACTORS = (2, 4)
SCHEDULES = ((1, 1), (1, 3), (3, 2))


def cell(dense, data, factor: int, schedule: tuple, freeze: bool, seeds: list[int]) -> list:
    """Top-1 % of BAR per seed for one budget, schedule and way of phase 1."""
    epochs, finetune = schedule
    budget = Budget("flops", 1 / factor)
    accs = []
    for seed in seeds:
        result = prune(
            dense,
            "bar",
            budget,
            data,
            seed=seed,
            epochs=epochs,
            finetune_epochs=finetune,
            freeze_weights=freeze,
        )
        accs.append(round(100 * evaluate(result.model, data.test), 2))
    return accs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    rows = []
    for dense_epochs in DENSE_EPOCHS:
        dense, data = dense_baseline("lenet5", "digits", epochs=dense_epochs)
        dense.eval()
        top = round(100 * evaluate(dense, data.test), 2)
        for factor in FACTORS:
            for schedule in SCHEDULES:
                joint = cell(dense, data, factor, schedule, False, seeds)
                fixed = cell(dense, data, factor, schedule, True, seeds)
                delta = statistics.median(fixed) - statistics.median(joint)
                rows.append(
                    {
                        "dense (epochs, top-1 %)": f"{dense_epochs}, {top}",
                        "FLOPs": f"{factor}x",
                        "epochs": "+".join(map(str, schedule)),
                        "trained with gates": " / ".join(map(str, joint)),
                        "fixed (default)": " / ".join(map(str, fixed)),
                        "fixed - trained": round(delta, 2),
                    }
                )
                print(rows[-1], flush=True)
    table = markdown_table(rows, list(rows[0]))
    print(table)
    write_section(
        "bar_freeze",
        "## BAR's phase 1: weights fixed or trained with the gates (LeNet-5, digits)\n\n"
        f"`.venv/bin/python -m bench.bar_freeze --seeds {args.seeds}` on {machine()}; LeNet-5 "
        "trained 2 or 10 epochs on digits, BAR (mixed) at a FLOP budget, *epochs*: gate "
        "epochs + fine-tuning epochs (about 20 steps an epoch); one top-1 per seed on the "
        "360-image test split (0.28 points an image); *fixed - trained*: medians.\n\n"
        + table
        + "\n",
    )


if __name__ == "__main__":
    main()
