"""Magnitude channel pruning: BAR's baseline at the same volume / FLOP budget.

Each channel is scored by the L1 norm of its filters (Li et al. 2017, "Pruning Filters for
Efficient ConvNets"), summed over the producers that share it (a channel group, or in mixed
mode one producer of a residual stream). Every gate unit BAR would have keeps the same
fraction r of its channels, the best-scored ones; r is the largest that fits the budget,
and the budget step BAR uses (lowest-scored out, highest back, scores normalised per unit)
lands the cost below it by at most min(1 % of it, 0.5 % of the dense cost), as BAR. The
slimmed network then trains as long as BAR trains in all (its phases 1 to 3), with the same
distillation and learning-rate drop, so the two differ only in how they choose the channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from compressor.errors import InputError
from compressor.methods.bar import BarConfig
from compressor.methods.bar.cost import at_least_one_, fit_units, keep_dict
from compressor.methods.bar.gates import GateUnit, build_units
from compressor.methods.bar.slim import (
    example_of,
    excluder,
    slim_model,
    slimmed_finetune_phase,
    structured_report,
    tied_fallback,
    with_residual,
)
from compressor.methods.base import (
    Method,
    MethodConfig,
    Result,
    jsonable,
    register_method,
)
from compressor.methods.phases import Phase, device_of
from compressor.surgery import mask_
from compressor.surgery.cost import CostModel
from compressor.surgery.fit import check_round_to, fit_budget
from compressor.surgery.pricing import Pricer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from compressor.data import Data

_BAR = BarConfig()
BISECTION_STEPS = 14  # the uniform keep ratio to 6e-5: finer than one channel of any layer


@dataclass(frozen=True)
class ChannelMagnitudeConfig(MethodConfig):
    """Magnitude channel pruning; training settings are BAR's so the two compare fairly."""

    # BAR trains phase 1 (epochs) then phases 2 + 3 (finetune_epochs): the same total here.
    finetune_epochs: int = _BAR.epochs + _BAR.finetune_epochs
    lowlr_fraction: float = _BAR.lowlr_fraction  # BAR's phase 3 share, lr drop at the end
    lowlr_factor: float = _BAR.lowlr_factor  # BAR's phase 3 lr multiplier
    lr: float = _BAR.lr  # BAR's weight lr
    momentum: float = _BAR.momentum  # BAR's SGD momentum
    weight_decay: float = _BAR.weight_decay  # BAR's weight decay
    batch_size: int = _BAR.batch_size  # BAR's batch size
    residual: str | None = _BAR.residual  # BAR's block style (None: by metric), as BAR
    distill: bool = _BAR.distill  # BAR's distillation from the dense model
    temperature: float = _BAR.temperature  # BAR's KD temperature
    alpha: float = _BAR.alpha  # BAR's KD alpha
    tolerance: float = _BAR.tolerance  # met from below within min(1 % B, 0.5 % V0), as BAR
    bn_batches: int = _BAR.bn_batches  # BatchNorm re-estimated after slimming, as BAR
    round_to: int | None = _BAR.round_to  # --round-to: multiples of this (None: BAR's default)


def filter_l1(model: torch.nn.Module, unit: GateUnit) -> torch.Tensor:
    """Per unit channel, the L1 norm of its filters summed over the producers it gates."""
    score = torch.zeros(unit.size)
    for target in unit.targets:
        weight = model.get_submodule(target.member.fqn).weight.detach()
        rows = weight.movedim(target.member.dim, 0).reshape(weight.shape[target.member.dim], -1)
        # scores and the decision stay on the CPU, with the cost engine
        score.index_add_(0, target.positions, rows.abs().sum(dim=1).cpu())
    return score


def top_fraction(scores: torch.Tensor, fixed: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keeps the fixed channels and the ceil(ratio * size) best-scored ones (at least one)."""
    count = max(1, math.ceil(ratio * len(scores) - 1e-9))
    order = torch.sort(scores, descending=True, stable=True).indices
    mask = fixed.clone()
    mask[order[:count]] = True
    return mask


@register_method("channel-magnitude")
class ChannelMagnitude(Method):
    """L1-norm channel pruning to a volume or FLOP budget, slimmed, then fine-tuned."""

    Config = ChannelMagnitudeConfig
    metrics = ("flops", "volume", "latency")  # FLOPs first: the default of a bare `--budget 4x`
    needs = "labels"
    demo_config: ClassVar[dict] = {"finetune_epochs": 5}
    smoke_config: ClassVar[dict] = {"finetune_epochs": 1, "bn_batches": 2}
    # LeNet-5 on digits kept 97 % at 4x volume (93 % at 10x); FLOPs, the default now, not re-run
    demo_budget: ClassVar[str] = "4x"

    def __init__(self, model, budget, config=None, **overrides):
        super().__init__(model, budget, config, **overrides)
        self.config = with_residual(self.config, self.budget.metric)
        check_round_to(self.config.round_to)
        self.example: tuple | None = None
        self.result: Result | None = None  # the slimmed model and report, once slimmed

    def prepare(self, example_inputs=None) -> None:
        """Scores every channel by filter L1 norm and takes the budgeted decision."""
        cfg = self.config
        self.example = example_of(self.model, example_inputs)
        self.costs = CostModel(self.model, self.example, cfg.residual)
        self.pricer = Pricer(self.costs, self.model, self.example, self.budget.metric)
        skip = excluder(cfg.exclude)
        self.tied = tied_fallback(self.model, self.costs, self.example, cfg.residual, skip)
        self.units = build_units(self.costs.analysis.groups, cfg.residual, skip, self.tied)
        if not self.units:
            raise InputError(f"{type(self.model).__name__} has no removable channels")
        raw = [filter_l1(self.model, u) for u in self.units]
        # normalised per unit, so the budget step compares channels across layers fairly
        self.scores = [s / s.max().clamp_min(1e-12) for s in raw]
        dense = self.pricer.dense()
        self.target = self.budget.keep * dense
        low = self.target - min(cfg.tolerance * self.target, 0.005 * dense)
        self.round_to = self.pricer.round_to(cfg.round_to)
        self.adjustment = fit_budget(
            fit_units(self.units, self.scores),
            self.pricer.cost,
            self.target,
            low,
            start=self._uniform(self._best_ratio()),
            round_to=self.round_to,
        )
        self.pricer.save()
        self.masks = self.adjustment.masks

    def cost_of(self, masks: list[torch.Tensor]) -> float:
        return self.pricer.cost(keep_dict(self.units, masks))

    def _uniform(self, ratio: float) -> list[torch.Tensor]:
        masks = [top_fraction(s, u.fixed, ratio) for s, u in zip(self.scores, self.units)]
        at_least_one_(self.units, masks, self.scores)
        return masks

    def _best_ratio(self) -> float:
        """The largest uniform keep ratio whose network fits the budget (bisection)."""
        low, high = 0.0, 1.0
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (low + high)
            low, high = (
                (mid, high) if self.cost_of(self._uniform(mid)) <= self.target else (low, mid)
            )
        return low

    def finalize(self) -> Result:
        """The slimmed model (slimmed now unless `phases()` has) and the report."""
        if self.result is None:
            self.slim()
        self.model.eval()
        return self.result

    def slim(self) -> None:
        """Zeroes the removed channels (norms included) and slims them away."""
        keep = keep_dict(self.units, self.masks)
        mask_(self.model, keep, self.example, residual=self.config.residual, norms=True)
        tied = self.costs.predict(keep, "tied")  # priced before slimming changes the layers
        slimmed = slim_model(self.model, keep, self.example, self.config.residual)
        config = jsonable(self.config.__dict__ | {"round_to": self.round_to})
        report = structured_report(
            self.name,
            config,
            self.budget,
            self.pricer,
            slimmed,
            self.example,
            self.adjustment,
            tied,
        )
        report["tied_streams"] = list(self.tied.values())
        self.model = slimmed.model  # what the fine-tuning phase trains
        self.result = Result(slimmed.model, report)

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """Prune once and slim, re-estimate BatchNorm, then fine-tune as long as BAR trains."""
        cfg = self.config
        # without labels the dense model's soft targets and pseudo-labels replace them
        loader = self.training_data(data, cfg.batch_size, cfg.temperature, cfg.alpha)
        distill = self.teacher()
        self.prepare(data.sample_inputs(2).to(device_of(self.model)))
        self.slim()
        yield slimmed_finetune_phase(self.model, loader, cfg, distill)
