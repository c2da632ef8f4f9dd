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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compressor.errors import InputError

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silences progress bars everywhere (the CLI's --quiet / --json)."""
    global _QUIET
    _QUIET = quiet


def show_progress() -> bool:
    """Progress bars only on an interactive terminal, never in CI or pipes."""
    return not _QUIET and sys.stderr.isatty() and not os.environ.get("CI")


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


def task_loss(model_out: torch.Tensor, y: torch.Tensor, x: torch.Tensor, distill: Distill | None):
    """Cross-entropy, or the distillation mix when a teacher is given."""
    if distill is None:
        return F.cross_entropy(model_out, y)
    with torch.no_grad():
        teacher_out = distill.teacher(x)
    kd = kd_loss(model_out, teacher_out, distill.temperature)
    if y is None or (y < 0).any():
        return kd  # unlabelled data: distillation alone
    return distill.alpha * kd + (1.0 - distill.alpha) * F.cross_entropy(model_out, y)


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
    description: str = "train",
) -> list[float]:
    """Trains `model` in place; returns the mean loss of each epoch.

    Args:
        penalty: extra loss term added each step (a method's `penalty()`).
        after_step: called after every optimiser step with training progress in [0, 1]
            (a method's `step()`: projections, schedules).
        clip_grad: max gradient norm, if any.
    """
    if len(loader) == 0:
        raise InputError("the training data is empty")
    if distill is not None:
        distill.teacher.eval()
    total = epochs * len(loader)
    history = []
    with progress(total, description) as advance:
        for epoch in range(epochs):
            history.append(
                _epoch(
                    model,
                    loader,
                    optimizer,
                    scheduler,
                    distill,
                    penalty,
                    after_step,
                    clip_grad,
                    epoch * len(loader),
                    total,
                    advance,
                )
            )
    return history


def _epoch(
    model, loader, optimizer, scheduler, distill, penalty, after_step, clip, done, total, advance
):
    model.train()
    losses = []
    for x, y in loader:
        loss = task_loss(model(x), y, x, distill)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        done += 1
        if after_step is not None:
            after_step(done / total)
        losses.append(loss.item())
        advance(loss=losses[-1])
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader | None) -> float | None:
    """Top-1 accuracy in [0, 1] of `model` on `loader` (None when there is no loader)."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    correct = count = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        count += len(y)
    model.train(was_training)
    return correct / count if count else None


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_dense(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
) -> list[float]:
    """Trains a dense baseline: SGD momentum 0.9, cosine schedule with one warm-up epoch."""
    optimizer = sgd(model.parameters(), lr, weight_decay=weight_decay)
    warmup = min(len(loader), epochs * len(loader) // 4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(epochs * len(loader), warmup)
    )
    return fit(model, loader, epochs=epochs, optimizer=optimizer, scheduler=scheduler)


@torch.no_grad()
def recalibrate_batchnorm_(
    model: nn.Module, loader: DataLoader, max_batches: int | None = None
) -> None:
    """Re-estimates BatchNorm running statistics on `loader` (cumulative average). In place."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for i, (x, _) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        model(x)
    model.eval()
    for m, (momentum, _) in zip(norms, saved):
        m.momentum = momentum
