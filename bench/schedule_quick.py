"""`python -m bench.schedule --quick`: every method and schedule kind of the schedule study
on digits LeNet-5 at 95 %, in about a minute; prints the report, writes nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from bench import schedule as study
from compressor.train import evaluate, train_dense

# every cell kind, one or two epochs each
QUICK_SCHEDULES = {
    "short": study.Schedule("short", 1, 1, False, (0,)),
    "medium": study.Schedule("medium", 2, 1, False, (0,)),
    "long": study.Schedule("long", 2, 1, True, (0,)),
}


def quick() -> None:
    """Smoke run of every cell kind at 95 % on digits LeNet-5; prints, writes nothing."""
    from bench import schedule_report
    from compressor import zoo
    from compressor.data import load_data

    study.SCHEDULES = QUICK_SCHEDULES  # the report reads the epochs from there
    data = load_data("digits", seed=0)
    torch.manual_seed(0)
    dense = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    train_dense(dense, data.train, epochs=1)

    def build() -> nn.Module:
        return zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)

    setup = study.Setup(dense.eval(), data, build, evaluate(dense, data.test))
    tasks = [study.Task("lenet5", s, 0.95, m, 0) for s in QUICK_SCHEDULES for m in study.METHODS]
    with tempfile.TemporaryDirectory() as tmp:

        def run(task: study.Task) -> dict:
            cell = study.run_cell(task, setup, QUICK_SCHEDULES[task.schedule], Path(tmp))
            return cell | {"dense_top1": setup.dense_top1}

        study.run_cells(tasks, Path(tmp) / "results.json", run)
        schedule_report.report(study.load_results(Path(tmp) / "results.json"), write=False)
