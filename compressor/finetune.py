"""Fine-tuning after pruning: the weights train on with the masks or channels fixed.

One loop (`train.fit`) under each method's own learning-rate schedule: constant (GMP,
ProbMask, as their official code), one drop (GSS halfway, BAR for the last steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.train import Distill, fit, sgd


def step_lambda(drop_step: int, factor: float) -> Callable[[int], float]:
    """Multiplier for LambdaLR: 1 before step `drop_step`, `factor` from it on."""
    return lambda step: 1.0 if step < drop_step else factor


def finetune_(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    lr_factor: Callable[[int], float] | None = None,
    distill: Distill | None = None,
) -> None:
    """Trains a pruned model's weights (masks or channels fixed) for `epochs`. In place.

    `lr_factor` multiplies the lr per step (LambdaLR); without it the lr stays constant.
    Nothing runs when `epochs` is 0.
    """
    if epochs <= 0:
        return
    scheduler = None
    if lr_factor is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    fit(
        model,
        loader,
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        distill=distill,
        description="fine-tune",
    )


def finetune_masked_(model: nn.Module, loader: DataLoader, cfg, distill: Distill | None) -> None:
    """Trains the weights under fixed masks at a constant `cfg.finetune_lr`. In place.

    `cfg` is a method config with `finetune_epochs`, `finetune_lr`, `momentum` and
    `weight_decay` (GMP's and ProbMask's).
    """
    optimizer = sgd(model.parameters(), cfg.finetune_lr, cfg.momentum, cfg.weight_decay)
    finetune_(model, loader, epochs=cfg.finetune_epochs, optimizer=optimizer, distill=distill)
