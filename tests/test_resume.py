"""Checkpoints and --resume: a killed run continues bit-identically; bad checkpoints refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import checkpoint
from compressor.errors import InputError
from compressor.io import load_model
from compressor.methods import prune

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# The runs train on `digits_npz` (256 images) so that each subprocess pays for few steps:
# 4 steps per epoch at batch 64. BAR: each step is two SGD steps (weights, gates) in the
# gated phase, one in fine-tuning; ProbMask: one SGD step (the scores use Adam).
STEPS = 256 // 64
RUNS = {
    "bar": ["--method", "bar", "--budget", "4x", "--epochs", "3", "--finetune-epochs", "2"],
    "probmask": ["--method", "probmask", "--sparsity", "0.9", "--epochs", "3"],
}
KILLS = [
    pytest.param("bar", 2 * STEPS + 2 * 2, id="bar-gated-phase-mid-epoch-2"),
    pytest.param("bar", 2 * 3 * STEPS + STEPS + 2, id="bar-finetune-phase-mid-epoch-2"),
    pytest.param("probmask", STEPS + 2, id="probmask-mid-epoch-2"),
]


def _killed(*args, kill_at: int) -> subprocess.CompletedProcess:
    """The CLI in a subprocess that SIGKILLs itself at the `kill_at`-th SGD step."""
    command = [sys.executable, str(ROOT / "tests" / "killed_run.py"), str(kill_at)]
    command += list(map(str, args))
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)


def _compress(*args) -> None:
    """The CLI in this process (no kill needed: a subprocess would only add its ~5 s start)."""
    run = CliRunner().invoke(cli, list(map(str, args)))
    assert run.exit_code == 0, run.output


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(lenet5_pt2, digits_npz, tmp_path_factory):
    """Each method once without interruption, with --checkpoint (the reference)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    done = {}
    for name, args in RUNS.items():
        ckpt, result = out / f"{name}.ckpt", out / f"{name}.pt2"
        _compress(
            "prune", lenet5_pt2, *args, "--data", digits_npz, "--checkpoint", ckpt, "-o", result
        )
        done[name] = (result, ckpt)
    return done


@pytest.mark.slow  # CLI subprocesses, killed and resumed
@pytest.mark.parametrize("name,kill_at", KILLS)
def test_killed_run_resumes_bit_identical(
    name, kill_at, lenet5_pt2, digits_npz, uninterrupted, tmp_path
):
    ckpt, result = tmp_path / "run.ckpt", tmp_path / "run.pt2"
    common = ("prune", lenet5_pt2, *RUNS[name], "--data", digits_npz, "-o", result)
    killed = _killed(*common, "--checkpoint", ckpt, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.exists() and not result.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] >= 1  # the kill came after at least one epoch boundary

    _compress(*common, "--resume", ckpt)
    reference = _weights(uninterrupted[name][0])
    got = _weights(result)
    assert reference.keys() == got.keys()
    for key in reference:
        assert torch.equal(reference[key], got[key]), key


@pytest.mark.slow
def test_resume_of_a_finished_run_replays_to_the_same_result(
    uninterrupted, lenet5_pt2, digits_npz, tmp_path
):
    result, ckpt = uninterrupted["bar"]
    again = tmp_path / "again.pt2"
    _compress(
        "prune", lenet5_pt2, *RUNS["bar"], "--data", digits_npz, "--resume", ckpt, "-o", again
    )
    reference, got = _weights(result), _weights(again)
    assert all(torch.equal(reference[k], got[k]) for k in reference)


@pytest.mark.slow
def test_checkpoint_holds_every_phase(uninterrupted):
    state = torch.load(uninterrupted["bar"][1], weights_only=True)
    assert state["format"] == checkpoint.FORMAT
    assert state["phases"] == ["bar: gates", "fine-tune"]
    assert (state["phase"], state["epoch"]) == (1, 2)
    assert len(state["snapshots"]) == 2
    assert set(state["current"]["method"]) == {
        "log_alpha",
        "gate_optimizer",
        "multiplier",
        "current",
    }


# --- refused checkpoints (through the Python API: no subprocess needed) ---------------------


def _bar(model, data, **kw):
    return prune(model, "bar", "4x", data, epochs=1, finetune_epochs=1, bn_batches=2, **kw)


@pytest.fixture(scope="module")
def bar_checkpoint(lenet5_digits, small_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "bar.ckpt"
    _bar(lenet5_digits, small_digits, checkpoint_path=path)
    return path


def test_damaged_checkpoint_is_refused(bar_checkpoint, lenet5_digits, small_digits, tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bar_checkpoint.read_bytes()[: bar_checkpoint.stat().st_size // 2])
    with pytest.raises(InputError, match="damaged.ckpt' is damaged"):
        _bar(lenet5_digits, small_digits, resume=damaged)


def test_other_file_is_refused(lenet5_pt2, lenet5_digits, small_digits, tmp_path):
    other = tmp_path / "weights.ckpt"
    torch.save({"epoch": 3}, other)
    with pytest.raises(InputError, match="is not a compression-run checkpoint"):
        _bar(lenet5_digits, small_digits, resume=other)
    with pytest.raises(InputError, match="does not exist"):
        _bar(lenet5_digits, small_digits, resume=tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    "change,field",
    [
        ({"budget": "8x"}, "budget"),
        ({"seed": 1}, "seed"),
        ({"lr": 0.5}, "config"),
    ],
)
def test_mismatched_checkpoint_is_refused(
    bar_checkpoint, lenet5_digits, small_digits, change, field
):
    budget = change.pop("budget", "4x")
    with pytest.raises(InputError, match=f"written by a different run \\({field}: checkpoint"):
        prune(
            lenet5_digits,
            "bar",
            budget,
            small_digits,
            epochs=1,
            finetune_epochs=1,
            bn_batches=2,
            resume=bar_checkpoint,
            **change,
        )


def test_checkpoint_of_another_model_is_refused(bar_checkpoint, lenet5_digits, small_digits):
    other = load_model_copy(lenet5_digits)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(InputError, match="model: checkpoint '"):
        _bar(other, small_digits, resume=bar_checkpoint)


def test_cli_refuses_checkpoint_onto_the_input(lenet5_pt2, tmp_path):
    args = [
        "prune",
        str(lenet5_pt2),
        *RUNS["bar"],
        "--data",
        "digits",
        "-o",
        str(tmp_path / "o.pt2"),
    ]
    result = CliRunner().invoke(cli, [*args, "--checkpoint", str(lenet5_pt2)])
    assert result.exit_code == 2
    assert "is the input model; choose another path" in result.output


def load_model_copy(model):
    import copy

    return copy.deepcopy(model)


def test_checkpoint_of_a_method_without_epochs_warns(lenet5_digits, tmp_path):
    from compressor.errors import CompressorWarning

    path = tmp_path / "none.ckpt"
    with pytest.warns(CompressorWarning, match="'magnitude-global' does not train in epochs"):
        prune(lenet5_digits, "magnitude-global", 0.5, checkpoint_path=path)
    assert not path.exists()
