"""A method's schedule as phases, and the one driver that trains them.

`Method.phases(data)` yields the method's training phases in order; the code between two
`yield`s is the phase boundary (BAR's decision and slimming, ProbMask's discrete mask,
BatchNorm re-estimation), and it runs when the loop asks for the next phase. A phase holds
everything one stretch of training needs: the model it trains (BAR's is the slimmed network
after phase 1), its epochs, its batches, its optimiser and LR schedule, its loss (task loss,
distillation, reconstruction, K mask samples, penalty: all the method adds) and its step
(gradient clip, optimiser, schedule, the method's `step(progress)`). The loop is

    for phase in method.phases(data):
        net = phase.model  # DistributedDataParallel(phase.model) in a data-parallel run
        for epoch in range(phase.epochs):
            for batch in phase.batches(epoch):
                loss = phase.loss(net, batch)
                loss.backward()
                phase.step()
    result = method.finalize()

and `prune()` runs exactly this (`drive`), adding checkpoints at epoch boundaries, the
data-parallel wrapper and a progress bar, none of which changes a number.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor import checkpoint, distributed
from compressor.errors import InputError
from compressor.train import Distill, progress, sgd, task_loss

if TYPE_CHECKING:
    from compressor.data import Data
    from compressor.methods.base import Method, Result

# how a data-parallel run splits a phase's batches over the ranks
SPLITS = ("shard", "slice")


def device_of(model: nn.Module) -> torch.device:
    """Where `model`'s parameters live (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def train_mode(model: nn.Module) -> None:
    """The usual training mode: every module in training mode."""
    model.train()


@dataclass
class Phase:
    """One stretch of a method's training; see the module docstring for the loop.

    Attributes:
        name: what a checkpoint and the progress bar call it ("bar: gates", "fine-tune").
        model: the network this phase trains (a method may replace it between phases).
        epochs: passes over `loader`.
        loader: the phase's batches; its generator is what a checkpoint saves.
        optimizer: steps the phase's parameter groups.
        loss: `(net, batch) -> loss`, `net` being `model` or its DDP wrapper.
        scheduler: the per-step LR schedule, if any.
        after_step: the method's `step(progress)` after every optimiser step.
        clip_grad: max gradient norm over `model`'s parameters, if any.
        steps: a cap on the phase's steps (FCPTS: a step count, not whole epochs).
        split: data-parallel runs: "shard" gives each rank its part of the data
            (DistributedSampler); "slice" draws the same batch on every rank, each
            training on its slice of it (FCPTS's reconstruction).
        mode: sets the model's train/eval modes at the start of each epoch.
        checkpointed: whether a checkpoint session saves and resumes this phase.
    """

    name: str
    model: nn.Module
    epochs: int
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    after_step: Callable[[float], None] | None = None
    clip_grad: float | None = None
    steps: int | None = None
    split: str = "shard"
    mode: Callable[[nn.Module], None] = train_mode
    checkpointed: bool = True
    done: int = field(default=0, init=False)  # optimiser steps taken in this phase
    _shard: DataLoader | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {SPLITS}")

    def batches_of(self) -> DataLoader:
        """This rank's loader: a shard of `loader` in a data-parallel run, else `loader`."""
        if self._shard is None:
            self._shard = distributed.shard(self.loader) if self.split == "shard" else self.loader
        return self._shard

    @property
    def total(self) -> int:
        """The phase's optimiser steps in all."""
        full = self.epochs * len(self.batches_of())
        return full if self.steps is None else min(self.steps, full)

    def batches(self, epoch: int) -> Iterator[list]:
        """The batches of `epoch` (0-based), this rank's part of each, on the model's device;
        sets the train mode."""
        loader = self.batches_of()
        self.mode(self.model)
        device = device_of(self.model)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        self.done = epoch * len(loader)
        rank, world = distributed.rank(), distributed.world_size()
        # islice stops before drawing a batch past the cap
        for batch in itertools.islice(loader, max(0, self.total - self.done)):
            if self.split == "slice" and world > 1:
                batch = [part[rank::world] for part in batch]
            yield [part.to(device) for part in batch]

    def step(self) -> None:
        """After `loss.backward()`: clip, optimiser and LR steps, the method's step, zero grads."""
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.done += 1
        if self.after_step is not None:
            self.after_step(self.done / self.total)
        self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def fixed_weights(model: nn.Module, fixed: bool = True) -> Iterator[None]:
    """Inside the block `model`'s parameters compute no gradients (restored after).

    A phase that trains only what lives outside the model (BAR's gates, on weights kept at
    lr 0) then skips the weight-gradient GEMMs, about 30 % of a ResNet-20 step, with the same
    result: nothing reads those gradients. Not inside a process group, where
    DistributedDataParallel needs a parameter that requires a gradient.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    frozen = frozen if fixed and not distributed.active() else []
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


def epochs_for(steps: int, loader: DataLoader) -> int:
    """The passes over `loader` that `steps` optimiser steps start."""
    return math.ceil(steps / len(loader)) if len(loader) else 0


def train(phase: Phase) -> None:
    """Trains one phase as the module docstring's loop does, with prune()'s extras.

    Inside a process group the model trains as DistributedDataParallel; inside a
    `checkpoint.session` the phase is checkpointed at every epoch boundary, and a phase a
    resumed run had finished loads its end state instead of training again.

    Raises:
        InputError: the phase's data is empty.
    """
    if phase.epochs <= 0 or (phase.steps is not None and phase.steps <= 0):
        return
    if len(phase.loader) == 0:
        raise InputError("the training data is empty")
    run = checkpoint.current() if phase.checkpointed else None
    index, start = None, 0
    if run is not None:
        index = run.begin_phase(phase.name)
        if run.finished(index):
            run.restore_finished(index, phase.model, phase.loader)
            return
        state = (phase.model, phase.optimizer, phase.scheduler, phase.loader)
        start = run.restore_current(index, *state)
    net = distributed.wrap(phase.model)
    with progress(phase.total, phase.name) as advance:
        advance(min(phase.total, start * len(phase.batches_of())))
        for epoch in range(start, phase.epochs):
            for batch in phase.batches(epoch):
                loss = phase.loss(net, batch)
                loss.backward()
                phase.step()
                advance(loss=loss.item())
            if run is not None:
                state = (phase.model, phase.optimizer, phase.scheduler, phase.loader)
                run.epoch_end(index, epoch + 1, phase.epochs, *state)


def drive(method: Method, data: Data | None) -> Result:
    """Every phase of `method.phases(data)`, trained by `train`, then `method.finalize()`."""
    for phase in method.phases(data):
        train(phase)
    return method.finalize()


def task_loss_of(
    distill: Distill | None = None, penalty: Callable[[], torch.Tensor] | None = None
) -> Callable[[nn.Module, tuple], torch.Tensor]:
    """A phase's loss on (x, y) batches: the task loss (or distillation), plus `penalty()`."""

    def loss(net: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        value = task_loss(net(x), y, x, distill)
        return value if penalty is None else value + penalty()

    return loss


def step_lambda(drop_step: int, factor: float) -> Callable[[int], float]:
    """An lr multiplier: 1 until `drop_step` steps, then `factor` (LambdaLR)."""
    return lambda step: 1.0 if step < drop_step else factor


def finetune_phase(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    lr_factor: Callable[[int], float] | None = None,
    distill: Distill | None = None,
) -> Phase:
    """Fine-tuning with the masks or channels fixed; `lr_factor` multiplies the lr per step."""
    scheduler = None
    if lr_factor is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return Phase("fine-tune", model, epochs, loader, optimizer, task_loss_of(distill), scheduler)


def masked_finetune_phase(model: nn.Module, loader: DataLoader, cfg, distill) -> Phase:
    """Fine-tuning under fixed masks at a constant `cfg.finetune_lr` (GMP's and ProbMask's)."""
    optimizer = sgd(model.parameters(), cfg.finetune_lr, cfg.momentum, cfg.weight_decay)
    return finetune_phase(
        model, loader, epochs=cfg.finetune_epochs, optimizer=optimizer, distill=distill
    )
