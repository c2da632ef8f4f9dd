"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

The training-time baseline for ProbMask. While the weights train, the sparsity rises
from s_i to s_f on the cubic schedule

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt},

and at each update the weights of smallest magnitude are masked. The ranking is global
(one magnitude threshold over all prunable layers, like ProbMask's one global budget), so
the two methods differ only in how they choose the weights. The ramp runs over the same
fraction of training as ProbMask's keep schedule (0.16 E to 0.6 E) and the same
fine-tuning follows, so the two are compared at equal epochs.

With `--pattern` every update already follows it (compressor/pattern_masks.py): blocks
are ranked by their l2 norm over the masked weights (the sum of w^2 per block) and kept
to s_t's count; N:M keeps the N largest |w| of every group, on the layers whose N:M mask
removes the least w^2 per pruned weight, as many as s_t's zeros allow (so the ramp grows
by whole layers; a patterned layer's removed weights score 0 and it stays chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from compressor.masks import apply_masks_, strip_, weight_of
from compressor.methods.base import Method, MethodConfig, Result, register_method
from compressor.methods.phases import Phase, masked_finetune_phase, task_loss_of
from compressor.pattern_masks import select_masks
from compressor.train import sgd_cosine

if TYPE_CHECKING:
    from collections.abc import Iterator

    from compressor.data import Data


@dataclass(frozen=True)
class GmpConfig(MethodConfig):
    """GMP hyper-parameters; training settings match ProbMask's so the two compare fairly."""

    epochs: int = 10  # ProbMask's default, so both train equally long
    finetune_epochs: int = 2  # ProbMask's default fine-tuning after the mask is final
    finetune_lr: float = 1e-3  # ProbMask's (official) fine-tuning lr, constant
    lr: float = 0.01  # ProbMask's weight lr for a trained model (cosine over training)
    momentum: float = 0.9  # the same SGD as ProbMask's weights
    weight_decay: float = 5e-4  # the same SGD as ProbMask's weights
    initial_sparsity: float = 0.0  # Zhu & Gupta s_i: 0 for a dense trained model
    start: float = 0.16  # t0 as a fraction of training: ProbMask's ts, for fairness
    end: float = 0.6  # t0 + n dt as a fraction of training: ProbMask's te
    # n: Zhu & Gupta prune every dt = 100-1000 steps; our runs are short (a ramp of ~1-3k
    # steps), so 20 updates (dt of ~50-150 steps) keep the ramp smooth.
    updates: int = 20
    batch_size: int = 64  # the toolkit's loader default, as ProbMask


def zhu_gupta_sparsity(
    update: int, updates: int, initial_sparsity: float, final_sparsity: float
) -> float:
    """s_t after `update` of `updates` pruning steps: s_f + (s_i - s_f)(1 - update/n)^3."""
    fraction = min(max(update, 0), updates) / updates
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - fraction) ** 3


@register_method("gmp")
class GradualMagnitude(Method):
    """Gradual magnitude pruning with a global magnitude ranking and an exact final count."""

    Config = GmpConfig
    needs = "labels"
    demo_config = {"epochs": 4, "finetune_epochs": 1}  # as ProbMask's demo
    smoke_config = {"epochs": 1, "finetune_epochs": 1, "updates": 2}

    def __init__(self, model, budget, config=None, **overrides):
        super().__init__(model, budget, config, **overrides)
        self.update = -1  # the last schedule update applied (-1: none yet)

    def prepare(self) -> None:
        """Installs an all-ones mask on every prunable layer."""
        apply_masks_(
            self.layers,
            {f: torch.ones_like(weight_of(m), dtype=torch.bool) for f, m in self.layers.items()},
        )

    def state_dict(self) -> dict:
        """The last schedule update applied (the masks are model buffers)."""
        return {"update": self.update}

    def load_state_dict(self, state: dict) -> None:
        self.update = state["update"]

    def update_index(self, progress: float) -> int:
        """Which of the n schedule updates is due at `progress` (-1 before the ramp)."""
        cfg = self.config
        if progress < cfg.start:
            return -1
        ramp = (progress - cfg.start) / (cfg.end - cfg.start)
        return min(cfg.updates, math.floor(ramp * cfg.updates + 1e-9))

    def step(self, progress: float) -> None:
        """After each optimiser step: re-mask when the schedule reaches its next update."""
        update = self.update_index(progress)
        if update > self.update:
            self.update = update
            self.mask_to(self.scheduled_keep(update))

    def scheduled_keep(self, update: int) -> float:
        """The keep fraction 1 - s_t after `update`; exactly the budget's once the ramp ends."""
        cfg = self.config
        if update >= cfg.updates:
            return self.budget.keep
        return 1.0 - zhu_gupta_sparsity(
            update, cfg.updates, cfg.initial_sparsity, self.budget.sparsity
        )

    @torch.no_grad()
    def mask_to(self, keep: float) -> None:
        """Keeps the round(keep * n) largest |W * mask| over all layers. In place.

        Ranking the masked weight keeps pruned weights pruned: momentum may still move the
        hidden original, but its effective value is 0.
        """
        effective = {f: m.weight.detach().abs() for f, m in self.layers.items()}
        count = round(keep * sum(e.numel() for e in effective.values()))
        if self.pattern is not None:  # group norms: l2, the sum of squares per unit
            effective = {f: e.square() for f, e in effective.items()}
        kept = select_masks(self, effective, count, self.floors(count))
        for fqn, module in self.layers.items():
            module.parametrizations.weight[0].mask.copy_(kept[fqn])

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """Training with the cubic ramp, the exact final mask, fine-tuning under it."""
        cfg = self.config
        loader = self.training_data(data, cfg.batch_size)
        self.prepare()
        optimizer, scheduler = sgd_cosine(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            total_steps=cfg.epochs * len(loader),
        )
        loss = task_loss_of(self.soft_targets)
        yield Phase("gmp", self.model, cfg.epochs, loader, optimizer, loss, scheduler, self.step)
        self.end_ramp()
        yield masked_finetune_phase(self.model, loader, cfg, self.soft_targets)

    def end_ramp(self) -> None:
        """Applies the final exact mask when a short run ended before the ramp did."""
        if self.update < self.config.updates:
            self.update = self.config.updates
            self.mask_to(self.budget.keep)

    def finalize(self) -> Result:
        """The final exact mask (if the ramp has not applied it), masks stripped."""
        self.end_ramp()
        strip_(self.model)
        self.model.eval()
        return Result(self.model, self.base_report())
