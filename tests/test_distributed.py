"""Data-parallel runs on torch.distributed (gloo, 2 processes on this CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compressor import distributed
from compressor.errors import CompressorError, InputError
from compressor.io import load_model
from compressor.stats import sparsity_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(command: list) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=ENV, capture_output=True, text=True
    )


def _check_ranks(report: dict, phases_epochs: int) -> None:
    info = report["distributed"]
    assert info["processes"] == 2
    digests = info["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical final state
    assert info["rank_checks"] == phases_epochs + 1  # every epoch, and once at the end


# The runs train on `digits_npz` (256 images, 2 x 32 per step): every rank check and the
# bit-identical final state need epochs, not many steps in each.
@pytest.mark.slow
def test_probmask_two_processes_via_nproc(lenet5_pt2, digits_npz, tmp_path):
    out, report = tmp_path / "p.pt2", tmp_path / "p.json"
    run = _run(
        [sys.executable, "-m", "cli.main", "prune", lenet5_pt2, "--method", "probmask"]
        + ["--sparsity", "0.9", "--data", digits_npz, "--epochs", "2", "--finetune-epochs", "1"]
        + ["--nproc", "2", "--check-ranks", "-o", out, "--report", report]
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("probmask: sparsity 90.00%") == 1  # rank 0 alone prints
    result = json.loads(report.read_text())
    _check_ranks(result, phases_epochs=2 + 1)
    zeros, total = sparsity_of(load_model(out).model)
    assert abs(zeros - round(0.9 * total)) <= 1  # the target, to within one weight


@pytest.mark.slow
def test_bar_two_processes_via_torchrun(lenet5_pt2, digits_npz, tmp_path):
    out, report = tmp_path / "b.pt2", tmp_path / "b.json"
    run = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "cli.main", "prune", lenet5_pt2, "--method", "bar", "--budget", "4x"]
        + ["--data", digits_npz, "--epochs", "2", "--finetune-epochs", "1", "--check-ranks"]
        + ["-o", out, "--report", report]
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(report.read_text())
    _check_ranks(result, phases_epochs=2 + 1)
    keep = result["achieved"]["keep"]
    assert 0.24 <= keep <= 0.25  # <= the 4x target, within 1 % of it
    assert load_model(out).model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_nproc_inside_a_launcher_must_agree(lenet5_pt2, tmp_path):
    env = {**ENV, "WORLD_SIZE": "3", "RANK": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "prune", str(lenet5_pt2), "--method", "gmp"]
        + ["--sparsity", "0.5", "--data", "digits", "--nproc", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "--nproc 2 inside a launcher that started 3 processes" in run.stderr


# --- the rank check itself: two gloo processes on a file store --------------------------------


def _worker(rank: int, store: str, results) -> None:
    """Checks an agreeing state, then a diverging one, in one process group (one spawn)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for diverge in (False, True):
            state = {"w": torch.arange(4.0) + (rank if diverge else 0), "step": 3}
            try:
                results[rank, diverge] = ("ok", distributed.digest_check("test state", state))
            except CompressorError as exc:
                results[rank, diverge] = ("error", str(exc))
    finally:
        dist.destroy_process_group()


def test_rank_check_passes_agreement_and_catches_divergence(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    agreed = results[0, False]
    assert results[1, False] == agreed
    assert agreed[0] == "ok" and agreed[1][0] == agreed[1][1]
    for rank in (0, 1):
        kind, message = results[rank, True]
        assert kind == "error"
        assert "ranks diverged in test state: rank 0 has state" in message
        assert "rank 1 has" in message


def test_shard_needs_a_batch_that_splits(monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    data = TensorDataset(torch.arange(10.0))
    with pytest.raises(InputError, match="batch size 5 does not split over 2 processes"):
        distributed.shard(DataLoader(data, batch_size=5))
    shard = distributed.shard(DataLoader(data, batch_size=4, shuffle=False))
    assert shard.batch_size == 2
    assert [int(v) for (batch,) in shard for v in batch] == [1, 3, 5, 7, 9]


def test_single_process_helpers_are_no_ops():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    digest = distributed.digest_check("x", {"a": torch.ones(2)})
    assert digest == [distributed.digest([torch.ones(2)])]


def test_worker_exit_keeps_output_and_code(tmp_path):
    """exit_worker skips interpreter teardown (the gloo abort) but loses no output or code."""
    script = (
        "import sys; from compressor import distributed\n"
        "print('to stdout', end=''); print('to stderr', end='', file=sys.stderr)\n"
        "distributed.exit_worker(3)\n"
    )
    run = _run([sys.executable, "-c", script])
    assert (run.returncode, run.stdout, run.stderr) == (3, "to stdout", "to stderr")
