"""Training data for training-time methods, with or without labels.

With labels, a method trains on them. Without (real deployments often have only inputs),
it trains against the dense model it started from: soft targets (KL at temperature T,
`train.kd_loss`) wherever a method's loss runs through `train.task_loss`, and hard
pseudo-labels (the dense model's argmax) in place of the missing labels, for the losses
and selections that need a class (cross-entropy, best-of-n's training accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from compressor.errors import InputError
from compressor.lift import clone_model
from compressor.train import Distill

if TYPE_CHECKING:
    from compressor.data import Data

# Hinton et al. 2015 and the toolkit's other distillation (BAR, FCPTS): T = 4; the soft
# targets carry the loss (alpha 0.9), the pseudo-labels add the dense model's decision.
TEMPERATURE = 4.0
ALPHA = 0.9
LABEL_BATCH = 256  # the dense model labels the inputs in batches of this size


@dataclass
class TrainingData:
    """What a training-time method trains on.

    Attributes:
        loader: (x, y) batches; y is the dense model's argmax when the data had no labels.
        soft: soft targets from the dense model (None when the data had labels).
        report: the report's "labels" entry.
    """

    loader: DataLoader
    soft: Distill | None
    report: dict


def training_data(
    data: Data,
    batch_size: int,
    dense: nn.Module | None,
    temperature: float = TEMPERATURE,
    alpha: float = ALPHA,
) -> TrainingData:
    """The training loader at `batch_size`; pseudo-labelled by `dense` when unlabelled.

    Call it before the method changes `dense` (a frozen copy is taken as the teacher).
    The unlabelled inputs are held in memory once, with their pseudo-labels.

    Raises:
        InputError: the data has no labels and no dense model was given.
    """
    generator = torch.Generator().manual_seed(data.seed)
    if data.has_labels:
        loader = replayed(data.train)
        if loader.batch_size != batch_size:
            loader = DataLoader(
                loader.dataset, batch_size=batch_size, shuffle=True, generator=generator
            )
        return TrainingData(loader, None, {"labels": "given"})
    if dense is None:
        raise InputError(
            f"data {data.name!r} has no labels; give the dense model to distil from "
            "(compressor.distill.training_data) or labelled data"
        )
    teacher = clone_model(dense).eval()
    x, pseudo = pseudo_labels(teacher, data.train)
    loader = DataLoader(
        TensorDataset(x, pseudo), batch_size=batch_size, shuffle=True, generator=generator
    )
    report = {
        "labels": "none",
        "distilled": f"from the dense model (soft targets T={temperature:g}, pseudo-labels)",
        "pseudo_label_classes": int(pseudo.unique().numel()),
    }
    return TrainingData(loader, Distill(teacher, temperature, alpha), report)


def replayed(loader: DataLoader) -> DataLoader:
    """`loader` with its shuffle restarted from its seed, so every run on the same data sees
    the same order however often it was read before (each pass moves the generator on)."""
    generator = loader.generator
    if generator is None or not isinstance(loader.sampler, RandomSampler):
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(generator.initial_seed()),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        drop_last=loader.drop_last,
    )


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input of `loader`'s dataset, in order, and the teacher's argmax for it."""
    ordered = DataLoader(loader.dataset, batch_size=LABEL_BATCH, shuffle=False)
    inputs = torch.cat([batch[0] for batch in ordered])
    device = next(teacher.parameters()).device
    labels = [teacher(x.to(device)).argmax(dim=1).cpu() for x in inputs.split(LABEL_BATCH)]
    labels = torch.cat(labels)
    return inputs, labels


def train_loader(data: Data, batch_size: int) -> DataLoader:
    """The labelled training loader, re-batched to `batch_size` when it differs.

    Unlabelled data needs the dense model: see `training_data`.
    """
    return training_data(data, batch_size, None).loader
