"""Post-training weight reconstruction against the dense model (METHODS.md §1), and the
POT-like baseline that uses it with fixed ERK masks (`erk-recon`).

One loop serves both FCPTS and `erk-recon`: the sparse student is trained for a fixed
number of SGD steps on a small unlabelled calibration set to match the frozen dense
model's outputs, `L_rec = T^2 KL(softmax(dense(x)/T) || softmax(sparse(x)/T))` (a model
with several outputs: that on the task output plus the MSE of every other one), plus
whatever penalty the method adds (FCPTS: its sparsity-control loss). BatchNorm statistics
are re-estimated on the calibration data at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.errors import InputError
from compressor.examples import calibration_inputs
from compressor.lift import clone_model
from compressor.masks import apply_masks_, strip_, weight_of
from compressor.methods.base import Method, MethodConfig, Result, register_method
from compressor.methods.magnitude import erk_counts, masks_from_counts
from compressor.methods.phases import Phase, epochs_for
from compressor.outputs import distill_loss, flat_tensors
from compressor.pattern_masks import layer_masks
from compressor.train import recalibrate_batchnorm_, sgd_cosine

if TYPE_CHECKING:
    from compressor.data import Data


@dataclass(frozen=True)
class ReconstructionConfig(MethodConfig):
    """Reconstruction settings shared by FCPTS and erk-recon (defaults: FCPTS official code)."""

    calib_samples: int = 1024  # official/paper: 1024 unlabelled calibration images
    steps: int = 1600  # official: 100 passes over the 1024 samples at batch 64
    batch_size: int = 64  # official run.sh: --batch-size 64
    lr: float = 0.01  # official: BASE_LR 0.04 scaled by batch/256 -> 0.01 (weights and thresholds)
    momentum: float = 0.9  # official: SGD momentum 0.9
    # official run.sh: TRAIN.WEIGHT_DECAY 3e-4; on every network parameter (biases and norms
    # too), not on FCPTS's thresholds (their own `threshold_decay`)
    weight_decay: float = 3e-4
    warmup_epochs: float = 1.0  # official run.sh: TRAIN.WARMUP_EPOCHS 1, then cosine per step
    temperature: float = 4.0  # official: DistillKL(4), net-wise on the final output


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with no parameter requiring gradients."""
    teacher = clone_model(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, inputs: torch.Tensor, batch_size: int) -> list:
    """The frozen dense model's outputs on `inputs`, computed once: one tensor per output.

    The teacher is fixed and in eval mode, so its outputs are the same every pass; caching
    them saves a quarter of each step's work without changing any result.
    """
    batches = [flat_tensors(teacher(x)) for x in inputs.split(batch_size)]
    return [torch.cat(parts) for parts in zip(*batches)]


def _norms_train_only(model: nn.Module) -> None:
    """BatchNorm in training mode (batch statistics, as official), everything else in eval
    mode so dropout and the like do not add noise to a deterministic target."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()


CURVE_POINTS = 20  # the report's loss curves: at most this many points


def loss_summary(history: dict) -> dict:
    """The loss history for the report: first and last epoch means, and two short curves.

    The curves hold at most CURVE_POINTS means, each over `epochs_per_point` epochs, at 4
    significant digits: the report travels inside every pack, and a 1600-step run's 100
    per-epoch floats were 4 KB of a LeNet-5 pack's 7 KB header (issue 19's floor).
    """
    per_epoch = max(1, history["steps_per_epoch"])
    steps = len(history["reconstruction"])
    span = per_epoch * max(1, math.ceil(steps / per_epoch / CURVE_POINTS))

    def means(values: list[float], size: int) -> list[float]:
        return [
            float(f"{sum(values[i : i + size]) / len(values[i : i + size]):.4g}")
            for i in range(0, len(values), size)
        ]

    rec, pen = history["reconstruction"], history["penalty"]
    rec_epochs, pen_epochs = means(rec, per_epoch), means(pen, per_epoch)
    return {
        "steps": steps,
        "calibration_samples": history["samples"],
        "reconstruction_first_epoch": rec_epochs[0] if rec_epochs else None,
        "reconstruction_last_epoch": rec_epochs[-1] if rec_epochs else None,
        "penalty_first_epoch": pen_epochs[0] if pen_epochs else None,
        "penalty_last_epoch": pen_epochs[-1] if pen_epochs else None,
        "epochs_per_point": span // per_epoch,
        "reconstruction_curve": means(rec, span),
        "penalty_curve": means(pen, span),
    }


class ReconstructionMethod(Method):
    """A post-training method whose schedule is: prepare, reconstruct, finalize, re-estimate BN."""

    Config: ClassVar[type[MethodConfig]] = ReconstructionConfig
    needs: ClassVar[str] = "inputs"
    # `compress demo` budget: a few seconds on LeNet-5 / digits
    demo_config: ClassVar[dict] = {"steps": 100, "calib_samples": 256}
    smoke_config: ClassVar[dict] = {"steps": 4, "calib_samples": 64}  # every phase, quickly
    history: dict | None = None
    calibration: DataLoader | None = None  # BatchNorm's re-estimation data (phases())

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups (weights with weight decay)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.config.weight_decay}]

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """Prepares against a frozen dense copy, then one reconstruction phase; `finalize()`
        re-estimates BatchNorm on the calibration data."""
        cfg = self.config
        if cfg.steps < 0 or cfg.calib_samples < 1 or cfg.batch_size < 1:
            raise InputError("steps must be >= 0, calib_samples and batch_size >= 1")
        self.teacher = frozen_copy(self.model)
        self.prepare()
        yield self.reconstruction_phase(data)
        self.calibration = data.calibration(cfg.calib_samples, cfg.batch_size)

    def reconstruction_phase(self, data: Data) -> Phase:
        """`steps` SGD steps over `param_groups()` matching the teacher on the calibration
        inputs, cosine per step after a linear warm-up of `warmup_epochs` passes."""
        cfg = self.config
        device = next(self.model.parameters()).device
        inputs = calibration_inputs(data, cfg.calib_samples, cfg.batch_size).to(device)
        targets = teacher_outputs(self.teacher, inputs, cfg.batch_size)
        seed = int(torch.randint(2**31 - 1, ()))  # drawn from the seeded global RNG: reproducible
        generator = torch.Generator().manual_seed(seed)
        dataset = TensorDataset(inputs, *targets)
        loader = DataLoader(dataset, cfg.batch_size, shuffle=True, generator=generator)
        optimizer, scheduler = sgd_cosine(
            self.param_groups(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=0.0,  # each group carries its own
            total_steps=cfg.steps,
            warmup_steps=round(cfg.warmup_epochs * len(loader)),
        )
        self.history = {"reconstruction": [], "penalty": [], "steps_per_epoch": len(loader)}
        self.history["samples"] = len(inputs)
        return Phase(
            self.name,
            self.model,
            epochs_for(cfg.steps, loader),
            loader,
            optimizer,
            self.reconstruction_loss,
            scheduler,
            steps=cfg.steps,
            split="slice",  # data-parallel: every rank draws the same batch, trains its slice
            mode=_norms_train_only,
            checkpointed=False,  # minutes long: not worth a checkpoint (README)
        )

    def reconstruction_loss(self, net: nn.Module, batch: tuple) -> torch.Tensor:
        """L_rec against the cached teacher outputs, plus the method's penalty (recorded)."""
        x, *target = batch
        rec = distill_loss(net(x), target, self.config.temperature)
        uses_penalty = type(self).penalty is not Method.penalty
        extra = self.penalty() if uses_penalty else torch.zeros(())
        self.history["reconstruction"].append(rec.item())
        self.history["penalty"].append(extra.item())
        return rec + extra

    @torch.no_grad()  # the same statistics, without keeping every activation alive
    def recalibrate_(self, model: nn.Module) -> None:
        """Eval mode; BatchNorm re-estimated on the calibration data once `phases()` ran."""
        model.eval()
        if self.calibration is not None:
            recalibrate_batchnorm_(model, self.calibration)

    def loss_report(self) -> dict:
        return {"loss": loss_summary(self.history)} if self.history is not None else {}


def erk_masks(method: Method) -> dict[str, torch.Tensor]:
    """`method`'s ERK magnitude masks, each layer at least at its floor (Method.floors).

    With a pattern, magnitude-erk's: blocks by summed |w| to each layer's ERK count; N:M
    on the layers that lose least |w| per pruned weight (compressor.pattern_masks).
    """
    sparsity, keep = method.budget.sparsity, method.budget.keep
    counts = erk_counts(method.layers, sparsity, keep, method.floors)
    floors = method.floors(sum(counts.values()))
    if method.pattern is not None:
        scores = {f: weight_of(m).detach().abs() for f, m in method.layers.items()}
        return layer_masks(method, scores, counts, floors)
    return masks_from_counts(method.layers, counts, floors)


@register_method("erk-recon")
class ErkReconstruction(ReconstructionMethod):
    """ERK magnitude masks, fixed, then the FCPTS weight reconstruction (a POT-like baseline)."""

    def prepare(self) -> None:
        apply_masks_(self.layers, erk_masks(self))

    def finalize(self) -> Result:
        strip_(self.model)
        self.recalibrate_(self.model)
        return Result(self.model, self.base_report() | self.loss_report())
