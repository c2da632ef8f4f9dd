"""bench/schedule.py: one cell on tiny synthetic data, and the results file's resume."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench import schedule
from compressor import zoo
from compressor.data import Data

TINY = schedule.Schedule("tiny", 1, 1, False, (0,))
TINY_SCRATCH = schedule.Schedule("tiny", 1, 1, True, (0,))


def _tiny_setup() -> schedule.Setup:
    """Learnable 4x4 inputs (the label is the brightest quadrant), an untrained MLP."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(160, 1, 4, 4, generator=generator)
    y = x.view(160, 2, 2, 2, 2).sum((2, 4)).flatten(1).argmax(1)

    def loader(part: slice, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(x[part], y[part])
        return DataLoader(dataset, 32, shuffle=shuffle, generator=torch.Generator())

    train, test = loader(slice(0, 128), True), loader(slice(128, None), False)
    data = Data(train, None, test, (1, 4, 4), num_classes=4, name="tiny", has_labels=True)

    def build():
        return zoo.build("lenet300", in_channels=1, num_classes=4, input_size=4)

    torch.manual_seed(0)
    return schedule.Setup(build(), data, build, 0.25)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_setup()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timeless(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k != "seconds"}


def test_cells_checkpoint_and_resume(tiny, tmp_path):
    """Each finished cell is saved; a rerun skips them; a lost cell reruns identically."""
    path = tmp_path / "results.json"
    tasks = [schedule.Task("tiny", "tiny", 0.9, m, 0) for m in schedule.METHODS]
    ran = []

    def run(task):
        ran.append(task.key)
        return schedule.run_cell(task, tiny, TINY, None)

    assert schedule.run_cells(tasks, path, run) == [t.key for t in tasks]
    cells = json.loads(path.read_text())["cells"]
    assert sorted(cells) == sorted(t.key for t in tasks)
    for cell in cells.values():
        assert cell["sparsity"] == pytest.approx(0.9, abs=1e-4)  # the budget, exactly
        assert cell["epochs"] == 2 and 0.0 <= cell["top1"] <= 1.0
    digest = _digest(path)
    assert schedule.run_cells(tasks, path, run) == []  # everything finished: nothing runs
    assert len(ran) == 3 and _digest(path) == digest
    # a cell lost (a kill before its save) reruns alone, to the same result: seeded
    results = json.loads(path.read_text())
    lost = results["cells"].pop(tasks[0].key)
    schedule.save_results(path, results)
    assert schedule.run_cells(tasks, path, run) == [tasks[0].key]
    assert _timeless(json.loads(path.read_text())["cells"][tasks[0].key]) == _timeless(lost)


def test_from_scratch_cell_checkpoints(tiny, tmp_path):
    """A long (from-scratch) cell leaves its per-epoch checkpoint and meets the budget."""
    task = schedule.Task("tiny", "long", 0.95, "magnitude-ft", 0)
    cell = schedule.run_cell(task, tiny, TINY_SCRATCH, tmp_path)
    assert cell["sparsity"] == pytest.approx(0.95, abs=1e-4)
    assert (tmp_path / "tiny-long-0.95-magnitude-ft-0.pt").exists()


def test_plan_puts_the_goals_cells_first():
    """LeNet-5's goal rows first, then every ResNet-20 row, extra medium seeds last."""
    tasks = schedule.plan()
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys))
    rows = list(dict.fromkeys((t.model, t.schedule) for t in tasks))
    assert rows[:3] == [("lenet5", "short"), ("lenet5", "medium"), ("lenet5", "long")]
    assert {t.seed for t in tasks[:27]} == {0, 1, 2}
    rows_of_seed0 = {(t.model, t.schedule) for t in tasks if t.seed == 0}
    last_row = next(i for i, t in enumerate(tasks) if (t.model, t.schedule) == ("resnet20", "long"))
    assert rows_of_seed0 <= {(t.model, t.schedule) for t in tasks[: last_row + 1]}
    assert {(t.model, t.schedule, t.seed) for t in tasks[last_row + 9 :]} == {
        ("lenet5", "medium", 1),
        ("lenet5", "medium", 2),
    }
    long = [(t.sparsity, t.method) for t in tasks if t.schedule == "long"][:6]
    goal = [(s, m) for s in (0.95, 0.98) for m in ("probmask", "gmp")]  # ProbMask vs GMP
    assert long == goal + [(0.95, "magnitude-ft"), (0.98, "magnitude-ft")]


def test_a_model_runs_its_own_schedule_length(monkeypatch):
    """ResNet-20's long row is 30 + 2 (MODEL_SCHEDULES); LeNet-5's the shared 60 + 4."""
    ran = {}
    setup = schedule.Setup(None, None, None, 0.5)
    monkeypatch.setattr(schedule, "setup_for", lambda model: setup)
    monkeypatch.setattr(
        schedule, "run_cell", lambda task, _, sched, __: ran.setdefault(task.model, sched) and {}
    )
    for model in ("lenet5", "resnet20"):
        schedule.study_cell(schedule.Task(model, "long", 0.9, "gmp", 0))
    assert (ran["lenet5"].epochs, ran["lenet5"].finetune_epochs) == (60, 4)
    assert (ran["resnet20"].epochs, ran["resnet20"].finetune_epochs) == (30, 2)
    assert schedule.schedules_for("resnet20")["short"] is schedule.SCHEDULES["short"]
