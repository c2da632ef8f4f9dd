"""Data-parallel runs on torch.distributed: process group, sharding, DDP, rank checks, launch.

One process per rank, started by torch's elastic launcher (`compress prune --nproc N`, or an
external `torchrun --nnodes M --nproc-per-node N -m cli.main prune ...`), which describes the
group in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `init_from_env()`
joins it with gloo for CPU tensors and nccl for CUDA ones.

What runs where:
  - `train.fit` trains a `DistributedDataParallel` wrapper of the model on a shard of each
    batch (DistributedSampler; the global batch is the configured one, split over ranks).
    Gradients, so parameters and every optimiser state, stay identical across ranks.
  - Everything else a method does (calibration, BatchNorm re-estimation, mask choices) runs
    replicated on the full data with the same seed, so it is identical by construction.
  - Method state that is not a gradient-synchronised parameter (BAR's log alpha, which its
    own optimiser steps) is averaged explicitly (`average_gradients_`), and `digest_check`
    all-gathers a hash of model and method state to prove the ranks agree.
  - Only rank 0 writes files and shows progress (`is_main()`).

With no process group (the usual single-process run) every helper is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Iterable
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from compressor.errors import CompressorError, InputError
from compressor.launch_env import launched, world_size_from_env  # noqa: F401  (public here)


def backend() -> str:
    """gloo for CPU tensors, plus nccl for CUDA ones when this torch has it."""
    return "cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo"


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a single-process run: the one process that writes and prints."""
    return rank() == 0


def init_from_env() -> bool:
    """Joins the process group the launcher described in the environment; True if joined."""
    if not launched():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """Ends a launched worker with `code`, flushing output but skipping interpreter teardown.

    gloo's worker threads drop a finished collective's tensors a moment after the collective
    returns, and dropping a tensor Python created takes the GIL. On a loaded machine that
    moment can come after the main thread has begun finalising the interpreter; the thread
    is then unwound mid-destructor and the whole process aborts ("terminate called without
    an active exception", SIGABRT) although its work is done (seen in about 1 run in 4 with
    both cores busy; pytorch/pytorch#179291). Every file is written and closed by now, so
    the worker leaves without finalising: nothing is left for the threads to race.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard(loader: DataLoader) -> DataLoader:
    """The calling rank's part of `loader`: the same global batch, split evenly over ranks.

    It has exactly `len(loader)` batches: DistributedSampler pads every rank to
    ceil(N / world) samples, and ceil(ceil(N / world) / (B / world)) = ceil(N / B) when the
    world divides B, so step counts and schedules computed from `loader` stay right.

    Raises:
        InputError: the batch size does not divide by the number of processes.
    """
    if not active():
        return loader
    world = world_size()
    if loader.batch_size is None or loader.batch_size % world:
        raise InputError(
            f"batch size {loader.batch_size} does not split over {world} processes; "
            f"set a batch size that is a multiple of {world} (e.g. --set batch_size=...)"
        )
    shuffle = isinstance(loader.sampler, RandomSampler)
    seed = loader.generator.initial_seed() if loader.generator is not None else 0
    sampler = DistributedSampler(
        loader.dataset, num_replicas=world, rank=rank(), shuffle=shuffle, seed=seed
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size // world,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


def wrap(model: nn.Module) -> nn.Module:
    """`DistributedDataParallel(model)` inside a process group, else `model` itself.

    DDP broadcasts rank 0's parameters and buffers on construction and averages gradients
    in buckets during backward. Every parameter that requires a gradient must receive one
    in each step (find_unused_parameters=False), which also lets a parameter that enters
    the loss only through a method's penalty (FCPTS's thresholds) be averaged.
    """
    if not active():
        return model
    device_ids = [torch.cuda.current_device()] if _on_cuda(model) else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _on_cuda(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.is_cuda


def average_gradients_(params: Iterable[torch.Tensor]) -> None:
    """Averages the gradients of parameters DDP does not own (a method's own). In place."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        grad.copy_(chunk.view_as(grad))


def digest(tensors: Iterable[torch.Tensor | float | int]) -> str:
    """SHA-256 over the exact bytes of `tensors` (and numbers), in order."""
    h = hashlib.sha256()
    for value in tensors:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def state_tensors(state) -> list:
    """Tensors and numbers of a nested state (dicts by sorted key, lists in order)."""
    if isinstance(state, dict):
        return [v for key in sorted(state, key=str) for v in state_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [v for item in state for v in state_tensors(item)]
    if isinstance(state, (torch.Tensor, int, float, bool, str)) or state is None:
        return [state]
    return [repr(state)]


def digest_check(what: str, state) -> list[str]:
    """All ranks' digests of `state`; raises on the first rank that differs from rank 0.

    Raises:
        CompressorError: the ranks disagree (a bug: state that should be synchronised is not).
    """
    mine = digest(state_tensors(state))
    if not active():
        return [mine]
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, mine)
    for r, other in enumerate(digests):
        if other != digests[0]:
            raise CompressorError(
                f"ranks diverged in {what}: rank 0 has state {digests[0][:12]}, rank {r} has "
                f"{other[:12]}; state that should be identical on every rank is not "
                "(please report this with the command line)"
            )
    return digests


def launch(nproc: int, argv: list[str]) -> int:
    """Runs `python -m cli.main *argv` in `nproc` local processes via torch's elastic launcher.

    Returns the exit code of the first failed worker (0 when all succeed). Each worker gets
    an equal share of the CPU threads unless OMP_NUM_THREADS is already set.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise InputError(f"--nproc {nproc}: give at least 1 process")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # workers say why
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone`
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "cli.main", *argv)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0
