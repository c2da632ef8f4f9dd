"""Training, evaluation and distillation loops shared by every method.

Progress bars (rich) show on a terminal and stay silent in pipes and CI. The loops take
a method's hooks (`penalty`, `after_step`) rather than knowing about any method.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compressor import checkpoint as run_checkpoint
from compressor import distributed
from compressor.errors import InputError
from compressor.outputs import OutputSpec, check_class_logits, distill_loss, select_output

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silences progress bars everywhere (the CLI's --quiet / --json)."""
    global _QUIET
    _QUIET = quiet


def show_progress() -> bool:
    """Progress bars only on an interactive terminal (rank 0), never in CI or pipes."""
    quiet = _QUIET or not distributed.is_main()  # one bar, on rank 0
    return not quiet and sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, **fields)`; draws a rich bar when `show_progress()`."""
    if not show_progress():
        yield lambda n=1, **_: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, status="")
        yield lambda n=1, **fields: bar.update(
            task, advance=n, status=" ".join(f"{k}={v:.4g}" for k, v in fields.items())
        )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation from a frozen teacher: alpha * KD + (1 - alpha) * CE."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9


def cosine_lambda(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier for LambdaLR: linear warm-up, then cosine decay to 0 over `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return factor


def task_loss(model_out, y: torch.Tensor, x: torch.Tensor, distill: Distill | None):
    """Cross-entropy on the task output, or the distillation mix when a teacher is given.

    `model_out` may hold several outputs (see compressor.outputs): cross-entropy reads the
    task output, distillation matches every output.
    """
    if distill is None:
        return F.cross_entropy(select_output(model_out), y)
    with torch.no_grad():
        teacher_out = distill.teacher(x)
    kd = distill_loss(model_out, teacher_out, distill.temperature)
    if y is None or (y < 0).any():
        return kd  # unlabelled data: distillation alone
    ce = F.cross_entropy(select_output(model_out), y)
    return distill.alpha * kd + (1.0 - distill.alpha) * ce


def fit(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    distill: Distill | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[float], None] | None = None,
    clip_grad: float | None = None,
    train_step: Callable[[nn.Module, torch.Tensor, torch.Tensor], float] | None = None,
    description: str = "train",
    start_epoch: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[float]:
    """Trains `model` in place; returns the mean loss of each epoch.

    Inside a process group the model trains as DistributedDataParallel on this rank's
    shard of every batch; inside a `checkpoint.session` the call is one phase of a run
    (checkpointed at every epoch boundary, skipped when a resumed run had finished it).

    Args:
        penalty: extra loss term added each step (a method's `penalty()`).
        after_step: called after every optimiser step with training progress in [0, 1]
            (a method's `step()`: projections, schedules).
        clip_grad: max gradient norm, if any.
        train_step: replaces forward, backward and the optimiser step: called with the
            network to run (the DDP wrapper in a process group) and the batch; returns the
            loss. `penalty`, `distill` and `clip_grad` are then the caller's business.
        start_epoch: first epoch to run (when resuming from a checkpoint).
        on_epoch_end: called with the number of finished epochs (e.g. to checkpoint).
    """
    run, phase, start_epoch = _begin_phase(
        description, model, optimizer, scheduler, loader, start_epoch
    )
    if start_epoch is None:
        return []
    if distill is not None:
        distill.teacher.eval()
    shard = distributed.shard(loader)
    net = distributed.wrap(model)
    total = epochs * len(shard)
    history = []
    hooks = (distill, penalty, after_step, clip_grad, train_step)
    with progress(total, description) as advance:
        advance(start_epoch * len(shard))
        for epoch in range(start_epoch, epochs):
            if hasattr(shard.sampler, "set_epoch"):
                shard.sampler.set_epoch(epoch)
            done = epoch * len(shard)
            history.append(_epoch(net, shard, optimizer, scheduler, hooks, done, total, advance))
            if run is not None:
                run.epoch_end(phase, epoch + 1, epochs, model, optimizer, scheduler, loader)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    return history


def _begin_phase(description, model, optimizer, scheduler, loader, start_epoch: int):
    """(run, phase, first epoch) of a fit: (None, None, start_epoch) outside a checkpoint
    session, first epoch None when a resumed run had finished the phase (restored here)."""
    if len(loader) == 0:
        raise InputError("the training data is empty")
    run = run_checkpoint.current()
    if run is None:
        return None, None, start_epoch
    phase = run.begin_phase(description)
    if run.finished(phase):
        run.restore_finished(phase, model, loader)
        return run, phase, None
    resumed = run.restore_current(phase, model, optimizer, scheduler, loader)
    return run, phase, max(start_epoch, resumed)


def _epoch(net, loader, optimizer, scheduler, hooks, done, total, advance):
    distill, penalty, after_step, clip, train_step = hooks
    net.train()
    losses = []
    for x, y in loader:
        if train_step is not None:
            loss_value = train_step(net, x, y)
        else:
            loss = task_loss(net(x), y, x, distill)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
            loss_value = loss.item()
        if scheduler is not None:
            scheduler.step()
        done += 1
        if after_step is not None:
            after_step(done / total)
        losses.append(loss_value)
        advance(loss=losses[-1])
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader | None, output: OutputSpec = None
) -> float | None:
    """Top-1 accuracy in [0, 1] of `model` on `loader` (None when there is no loader).

    `output` picks the model output holding the class logits (default: the first).
    """
    if loader is None:
        return None
    from compressor.stats import restore_modes, training_modes

    modes = training_modes(model)
    model.eval()
    correct = count = 0
    for x, y in loader:
        # checked to hold a logit per label: a box head would give a silent wrong answer
        logits = check_class_logits(model(x), int(y.max()) + 1 if len(y) else None, output)
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    restore_modes(model, modes)
    return correct / count if count else None


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with momentum and weight decay, the toolkit's default optimiser."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def sgd_cosine(
    params,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD and its per-step schedule: linear warm-up, then cosine decay to 0."""
    optimizer = sgd(params, lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(total_steps, warmup_steps)
    )
    return optimizer, scheduler


def train_dense(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    checkpoint: str | Path | None = None,
) -> list[float]:
    """Trains a dense baseline: SGD momentum 0.9, cosine schedule with one warm-up epoch.

    With `checkpoint`, state is saved after every epoch, and a run that finds an existing
    checkpoint at that path resumes from it.
    """
    optimizer, scheduler = sgd_cosine(
        model.parameters(),
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
        total_steps=epochs * len(loader),
        warmup_steps=min(len(loader), epochs * len(loader) // 4),
    )
    start, on_epoch_end = 0, None
    if checkpoint is not None:
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}
        if Path(checkpoint).exists():
            start = load_checkpoint(checkpoint, **state)["epoch"]

        def on_epoch_end(epoch: int) -> None:
            save_checkpoint(checkpoint, epoch=epoch, **state)

    return fit(
        model,
        loader,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        start_epoch=start,
        on_epoch_end=on_epoch_end,
    )


CHECKPOINT_FORMAT = "compressor.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path, *, model, optimizer, scheduler=None, loader=None, epoch: int, extra=None):
    """Writes model, optimiser, schedule position and RNG states atomically."""
    from compressor.io import atomic_write

    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **run_checkpoint.rng_state(loader),
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, *, model, optimizer, scheduler=None, loader=None) -> dict:
    """Restores a checkpoint written by `save_checkpoint` into the given objects.

    Raises:
        InputError: not a checkpoint, another version, or made for a different model.
    """
    state = run_checkpoint.read(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{str(path)!r} is not a compressor checkpoint")
    if state["version"] != CHECKPOINT_VERSION:
        raise InputError(
            f"checkpoint {str(path)!r} has version {state['version']}, expected {CHECKPOINT_VERSION}"
        )
    run_checkpoint.restore_training(path, state, model, optimizer, scheduler)
    run_checkpoint.restore_rng(state, loader)
    return state


@torch.no_grad()
def recalibrate_batchnorm_(
    model: nn.Module, loader: DataLoader, max_batches: int | None = None
) -> None:
    """Re-estimates BatchNorm running statistics on `loader` (cumulative average). In place."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    device = next(model.parameters()).device  # the loader's batches may be on the CPU
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for i, (x, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        model(x.to(device))
    model.eval()
    for m, (momentum, _) in zip(norms, saved):
        m.momentum = momentum
