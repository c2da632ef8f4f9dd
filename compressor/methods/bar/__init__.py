"""BAR: budget-aware structured channel pruning, physically slimmed (METHODS.md §3).

Lemaire, Achkar & Jodoin, "Structured Pruning of Neural Networks with Budget-Aware
Regularization" (CVPR 2019), with the supplement's mixed-connectivity residual blocks.

Every prunable channel gets a Hard Concrete gate after its norm layer. Training minimises

    L = L_task + lambda * f(V, a, b) * L_S,   L_S = sum_l A_l sum_i P(z_{l,i} > 0),

where V is the hard cost (activation volume or FLOPs) of the channels whose test gate is
nonzero, f = g((V - a) / (b - a)) with g(x) = x^2 / (1 - x) is a barrier used as a plain
number (no gradient), and b falls from 1.01 V0 to the budget B along the sigmoidal T(t, d).
Then: the decision is taken (channels whose test gate is 0 die; a final step removes or
restores channels by gate value until the cost lies within the tolerance below B), the gate
values are folded into the norm layers, `surgery.slim_` removes the dead channels, and the
slimmed network trains more (phase 2) and a little more at a lower learning rate (phase 3).

Choices of ours, where METHODS.md is silent or we depart from it:

* L_S enters divided by the dense cost V0, so `lambda_` does not depend on the input size.
* The gates have their own SGD and, since f is 1e10 once the cost reaches b, the penalty's
  gradient norm is capped (`gate_clip`).
* One Hard Concrete sample per channel and forward, shared by every example of the batch
  (Louizos et al. draw one per example). Why: a gate is then one vector broadcast over the
  batch, as at test time, and the barrier's V is a property of the network, not of an
  example; the price is a noisier gradient per step.
* Every gate unit keeps at least one channel (its highest log alpha) even when all its test
  gates are 0, where METHODS.md would let the layer die. Why: a layer with no channels
  makes the output constant, which DESIGN.md counts as a failure, not a result.
* Fixed channels (model inputs and outputs, ops surgery cannot slim) are left out of L_S
  though they count in V. Why: no gate can remove them, so penalising them would only push
  gates that cannot act; their cost is the same whatever happens.
* The tolerance: the cost ends below B by at most min(`tolerance` * B, 0.5 % V0), not
  simply "within 1 %": the 1 % of issue 7, tightened to DESIGN.md's promise that the
  achieved keep fraction is within 0.5 % (of V0) of the request, which prune() checks.
* Phase 1 trains the gates alone (`freeze_weights`): the weights keep the trained model's
  values (lr 0; outside data-parallel runs they compute no gradients: the same result, a
  2-epoch run 19 % faster, bench.bar_phase1), where the paper trains both. Why
  (bench.bar_short: ResNet-20, 3.7x FLOPs, medians): +4.1 / +2.9 top-1 points tied / mixed
  at 1+2 epochs, +1.6 / +2.8 at 4+4; weights trained under sampled gates drift further than
  fine-tuning recovers. LeNet-5 (bench.bar_freeze, 2x / 4x, 1+1 to 3+2): +0.4 to +1.8, +1.4
  to +6.7 two epochs into training.
* With fixed weights a kept channel enters the slimmed network as trained, at gate 1
  (`fold_gates`), where the paper folds its test gate value into its norm (below 1 until
  log alpha passes ln 11; it starts at 0). Why: fixed weights never learned those scales.
  ResNet-20 (bench.bar_short, 3.7x FLOPs): +2.0 / +2.8 points tied / mixed at 1+2 (3
  seeds, each ahead), +0.3 / +0.4 at 4+4 (2 seeds). Weights trained with the gates: folded.
* Phases 2 and 3 train the slimmed network, which computes exactly what the network with
  frozen gates computes (gate values folded into the norms) at a fraction of the cost;
  BatchNorm statistics are re-estimated after slimming.
* For the FLOP metric a channel's A_l is its dense MACs in its producers plus its consumers
  (shared among a mixed stream's producers).
* A latency re-fit (the exported graph missed the request: compressor/latency_check.py)
  does not train the gates again: it takes the decision anew from the gates phase 1 left,
  at the corrected target, slims and fine-tunes. Why: a re-fit then costs the fine-tuning
  alone, and successive re-fits threshold the same log alphas, so the measured speed-up
  follows the target; retrained gates gave a different network each time (tied ResNet-20
  at 3x overshot to 3.7x after 3 re-fits, bench/RESULTS.md latency_budget).
* Under a latency budget residual streams are tied unless `residual` is given: mixed
  joins run slowly in onnxruntime (bench.latency: mixed ResNet-20/56 reached 1.6x / 1.3x
  where 2x was asked, tied ones 2.1x / 2.0x, and kept more top-1).
* For the latency metric (a per-layer onnxruntime table, surgery/latency.py) A_l is that
  FLOP weight times the unit's own ms per MAC: what the table saves per MAC saved when the
  unit keeps half its channels (`Pricer.rate`); V and the budget step use the table itself.
* Under FLOP and latency budgets every unit keeps `min_keep` (0.375) of its channels or more
  (best log alpha), halving while the budget cannot afford it (METHODS.md has none). Why: the
  gates collapse whole stages and streams to 8 channels, which fine-tune worse. Tied, 3
  epochs, ResNet-20 / -56 / MobileNetV2: +7.30 / +1.58 / +1.72 top-1 at 2x measured, +1.92 /
  +1.21 / +1.17 at 4x FLOPs; mixed at 4x FLOPs 0 / 0 / +0.64 (bench/RESULTS.md latency_floor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from compressor import distributed
from compressor.errors import InputError
from compressor.methods.bar.cost import at_least_one_, fit_units, keep_dict, unit_weights
from compressor.methods.bar.gates import (
    Gates,
    barrier_multiplier,
    build_units,
    init_log_alpha_,
    transition,
)
from compressor.methods.bar.slim import (
    budget_note,
    example_of,
    excluder,
    own_counts,
    slim_model,
    slimmed_finetune_phase,
    structured_report,
    tied_fallback,
    with_residual,
)
from compressor.methods.base import Method, MethodConfig, Result, jsonable, register_method
from compressor.methods.phases import Phase, device_of, epochs_for, fixed_weights, task_loss_of
from compressor.surgery.cost import CostModel
from compressor.surgery.fit import check_min_keep, check_round_to, fit_budget, floor_of
from compressor.surgery.pricing import Pricer
from compressor.surgery.streams import check_exact
from compressor.train import sgd

if TYPE_CHECKING:
    from collections.abc import Iterator

    from compressor.data import Data


@dataclass(frozen=True)
class BarConfig(MethodConfig):
    """BAR hyper-parameters, grouped as METHODS.md §3's paragraphs; each default names its
    source. `--set name=value` takes any field by its flat name."""

    # --- Gates, L_S and the barrier (METHODS.md: gate, sparsity loss, barrier, budget
    # schedule). Hard Concrete z per channel; L = L_task + lambda f(V, a, b) L_S.
    beta: float = 2 / 3  # Hard Concrete temperature (Louizos et al. 2018; METHODS.md)
    gamma: float = -0.1  # stretch interval lower end (METHODS.md)
    zeta: float = 1.1  # stretch interval upper end (METHODS.md)
    log_alpha_init: float = 0.0  # METHODS.md: log alpha = 0 + 0.01 U(0, 1)
    log_alpha_noise: float = 0.01  # METHODS.md: the 0.01 U(0, 1) part
    # Weight of L_S. Ours multiplies L_S / V0 (L_S in units of the dense cost), so one value
    # serves every input size; the paper's lambda on raw volumes is this / V0.
    lambda_: float = 1.0
    transition_d: float = 10.0  # METHODS.md: d = 10 in T(t, d)
    start_slack: float = 0.01  # METHODS.md: b starts at 1.01 V0
    # a = B (1 - margin): "a is just below B"; 1e-4 as the public BAR port's margin.
    margin: float = 1e-4
    # The gates' own SGD. A step in proportion to the gradient keeps L_S's weighting (a
    # channel of a large feature map is pushed harder), which Adam's per-gate normalisation
    # would erase: its gates would all drift down together and die together.
    gate_lr: float = 0.1
    gate_momentum: float = 0.9  # the usual SGD momentum
    # f is 1e10 once the cost reaches b; a finite step needs a cap. The penalty's gradient
    # norm (over all log alphas) is capped at this, so the gates then move in L_S's
    # direction at a bounded rate while the task gradient still counts (ours; METHODS.md
    # leaves the optimiser open). About the task gradient's norm on our models.
    gate_clip: float = 1.0

    # --- The decision and slimming (METHODS.md: hard-prune; mixed-connectivity blocks).
    # supplement: mixed-connectivity blocks; "tied" for comparison; None: tied under a
    # latency budget, else mixed (slim.with_residual)
    residual: str | None = None
    # The budget is met from below to within min(tolerance * B, 0.5 % V0): issue 7's 1 %,
    # tightened to DESIGN.md's 0.5 % of the dense cost where that is smaller.
    tolerance: float = 0.01

    # --- Schedule (METHODS.md: train with gates, hard-prune, train more, lower the lr and
    # train a little more; paper 80/40/10 epochs on CIFAR, scaled down for small data).
    epochs: int = 8  # phase 1, the gates learn (the weights too without freeze_weights)
    gate_steps: int | None = None  # phase 1 takes this many steps instead of `epochs` (ours)
    finetune_epochs: int = 5  # phases 2 + 3, gates frozen (the slimmed net trains)
    lowlr_fraction: float = 0.2  # phase 3's share of phases 2 + 3: paper 10 of 40 + 10 epochs
    lowlr_factor: float = 0.1  # phase 3 "lowers the learning rate": the usual 10x step
    freeze_weights: bool = True  # phase 1 trains the gates alone (ours; the paper: both)
    fold_gates: bool | None = None  # gate values folded (paper) or 1; None: not freeze_weights
    # Weights: SGD momentum 0.9, wd 5e-4 (paper's CIFAR setup). We start from a trained
    # model, so a fine-tuning lr (a tenth of the usual 0.1), constant until phase 3.
    lr: float = 0.01
    momentum: float = 0.9  # paper: SGD momentum 0.9
    weight_decay: float = 5e-4  # paper: weight decay 5e-4
    batch_size: int = 64  # the toolkit's loader default (paper: 64 on CIFAR)
    # BatchNorm statistics gathered under sampled gates are re-estimated on the slimmed
    # model (this many batches) before it trains on.
    bn_batches: int = 100
    # --round-to: every slimmed layer keeps a multiple of this many channels (or all of
    # them), the widths vectorised kernels run fastest at; None: 1, or under a latency
    # budget the multiple where the measured table's kernel rate steps up
    round_to: int | None = None
    # Every unit keeps this share of its channels or more while the budget allows (ours);
    # None: fit.DEFAULT_FLOOR under FLOP and latency budgets, else 0 (gates alone decide)
    min_keep: float | None = None

    # --- Distillation (METHODS.md: objective): L_task is KD from the dense model.
    distill: bool = True  # METHODS.md: KD from the dense model when one exists, else CE
    temperature: float = 4.0  # METHODS.md: KD T = 4
    alpha: float = 0.9  # METHODS.md: KD alpha = 0.9


@register_method("bar")
class Bar(Method):
    """BAR (METHODS.md §3): Hard Concrete gates, barrier-weighted L_S, slim, fine-tune."""

    Config = BarConfig
    # FLOPs first: a bare `--budget 4x` means 4x fewer MACs, what users deploy for; volume
    # (the paper's own metric) stays available with --budget-metric volume
    metrics = ("flops", "volume", "latency")
    needs = "labels"
    demo_config: ClassVar[dict] = {"epochs": 3, "finetune_epochs": 2}
    smoke_config: ClassVar[dict] = {"epochs": 1, "finetune_epochs": 1, "bn_batches": 2}
    # LeNet-5 on digits kept 96 % at 4x volume (94 % at 10x); FLOPs, the default now, not re-run
    demo_budget: ClassVar[str] = "4x"

    def __init__(self, model, budget, config=None, **overrides):
        super().__init__(model, budget, config, **overrides)
        self.config = with_residual(self.config, self.budget.metric)
        if not (self.config.gamma < 0.0 and self.config.zeta > 1.0 and self.config.beta > 0):
            raise InputError("Hard Concrete needs gamma < 0 < 1 < zeta and beta > 0")
        check_round_to(self.config.round_to)
        if self.config.gate_steps is not None and self.config.gate_steps < 1:
            raise InputError(f"gate_steps {self.config.gate_steps}: give 1 or more steps")
        self.round_to = self.config.round_to  # the one used: set by decide()
        self.min_keep = check_min_keep(self.config.min_keep)  # the one used: set by decide()
        if self.config.fold_gates is None:  # the report's config shows the way taken
            fold = not self.config.freeze_weights
            self.config = dataclasses.replace(self.config, fold_gates=fold)
        self.example: tuple | None = None
        self.gates: Gates | None = None
        self.masks: list[torch.Tensor] | None = None
        self.multiplier = 0.0
        self.current = 0.0
        self.result: Result | None = None  # the slimmed model and report, once slimmed

    # --- lifecycle -------------------------------------------------------------------------

    def prepare(self, example_inputs=None) -> None:
        """Installs one Hard Concrete gate per prunable channel (hooks after each norm)."""
        cfg = self.config
        self.example = example_of(self.model, example_inputs)
        self.costs = CostModel(self.model, self.example, cfg.residual)
        self.pricer = Pricer(self.costs, self.model, self.example, self.budget.metric)
        skip = excluder(cfg.exclude)
        self.tied = tied_fallback(self.model, self.costs, self.example, cfg.residual, skip)
        # a layout no decision could slim exactly is refused before training, not after
        check_exact(self.model, self.costs.analysis.groups, self.example, skip)
        units = build_units(self.costs.analysis.groups, cfg.residual, skip, self.tied)
        if not units:
            raise InputError(f"{type(self.model).__name__} has no removable channels")
        init_log_alpha_(units, cfg.log_alpha_init, cfg.log_alpha_noise)
        counts = own_counts(units)
        for unit in units:  # A_l: under latency the FLOP weights at the unit's own ms per MAC
            unit.weight = unit_weights(self.pricer, self.costs, unit, counts.get(unit.group.id, 0))
        self.gates = Gates(units, cfg.beta, cfg.gamma, cfg.zeta)
        self.gates.to_(device_of(self.model))
        self.gates.install_(self.model)
        self.gate_optimizer = torch.optim.SGD(
            self.gates.parameters(), lr=cfg.gate_lr, momentum=cfg.gate_momentum
        )
        self.dense_cost = self.pricer.dense()
        self.target = self.budget.keep * self.dense_cost
        self._refresh(0.0)

    def penalty(self) -> torch.Tensor:
        """lambda * f * L_S / V0, f the barrier at the last step (a plain number).

        Scaled down when its gradient norm exceeds `gate_clip` (f = 1e10 at the wall); the
        gradient of L_S in log alpha is w * p * (1 - p), p = P(z > 0) per channel.
        """
        cfg = self.config
        units = self.gates.units
        sparsity_loss = sum((u.weight * self.gates.expected_live(u)).sum() for u in units)
        with torch.no_grad():
            slopes = [u.weight * (p := self.gates.expected_live(u)) * (1 - p) for u in units]
            norm = float(torch.cat(slopes).norm()) * cfg.lambda_ * self.multiplier
        scale = min(1.0, cfg.gate_clip * self.dense_cost / norm) if norm > 0 else 1.0
        return scale * cfg.lambda_ * self.multiplier * sparsity_loss / self.dense_cost

    def step(self, progress: float) -> None:
        """Updates the gates (their own SGD), then the hard cost and the barrier multiplier."""
        if self.masks is not None:
            return  # the decision is taken: gates are frozen
        distributed.average_gradients_(self.gates.parameters())  # DDP does not own them
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)
        self._refresh(progress)

    def state_dict(self) -> dict:
        """log alpha (kept outside the model), the gates' optimiser, the barrier state."""
        if self.gates is None:
            return {}
        return {
            "log_alpha": [u.log_alpha.detach().clone() for u in self.gates.units],
            "gate_optimizer": self.gate_optimizer.state_dict(),
            "multiplier": self.multiplier,
            "current": self.current,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.gates is None or not state:
            return
        with torch.no_grad():
            for unit, value in zip(self.gates.units, state["log_alpha"], strict=True):
                unit.log_alpha.copy_(value)
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.multiplier, self.current = state["multiplier"], state["current"]

    def finalize(self) -> Result:
        """The slimmed, gate-free model (slimmed now unless `phases()` has) and the report."""
        if self.result is None:
            self.slim()
        self.model.eval()
        return self.result

    def slim(self) -> None:
        """Meets the budget, folds the gates into the norms, removes hooks, slims."""
        if self.masks is None:
            self.decide()
        self.gates.bake_(self.model)
        self.gates.remove_()
        keep = keep_dict(self.gates.units, [m.cpu() for m in self.masks])
        tied = self.costs.predict(keep, "tied")  # priced before slimming changes the layers
        slimmed = slim_model(self.model, keep, self.example, self.config.residual)
        used = {"round_to": self.round_to, "min_keep": self.min_keep}
        config = jsonable(self.config.__dict__ | used)
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
        report["budget_step"]["note"] = budget_note(self.adjustment, self.dense_cost)
        report["tied_streams"] = list(self.tied.values())
        self.model = slimmed.model  # what the fine-tuning phases train
        self.result = Result(slimmed.model, report)

    # --- the schedule and the decision ------------------------------------------------------

    def budget_bounds(self, progress: float) -> tuple[float, float]:
        """(a, b) of the barrier at `progress`: b from 1.01 V0 down to B along T(t, d)."""
        cfg = self.config
        start = (1.0 + cfg.start_slack) * self.dense_cost
        high = start - (start - self.target) * transition(progress, cfg.transition_d)
        return self.target * (1.0 - cfg.margin), high

    def learned_masks(self) -> list[torch.Tensor]:
        """Live channels by the test gates (z > 0), at least one per unit."""
        units = self.gates.units
        masks = [self.gates.test_values(u).detach() > 0 for u in units]
        at_least_one_(units, masks, [u.log_alpha.detach() for u in units])
        return masks

    def cost_of(self, masks: list[torch.Tensor]) -> float:
        # the cost engine counts on the CPU, wherever the gates live
        return self.pricer.cost(keep_dict(self.gates.units, [m.cpu() for m in masks]))

    def _refresh(self, progress: float) -> None:
        self.current = self.cost_of(self.learned_masks())
        low, high = self.budget_bounds(progress)
        self.multiplier = barrier_multiplier(self.current, low, high)

    def decide(self) -> None:
        """Takes the final channel decision and freezes the gates at it.

        The learned decision (test gate > 0) is kept when its cost lies within
        `tolerance` below the budget; otherwise the channels with the lowest log alpha are
        removed, or those with the highest restored, until it does. With `fold` kept
        channels keep their test gate value and a restored one (test gate 0) enters with
        gate 1; without it every kept channel enters with gate 1.
        """
        units = self.gates.units
        low = self.target - min(self.config.tolerance * self.target, 0.005 * self.dense_cost)
        scores = [u.log_alpha.detach() for u in units]
        self.round_to = self.pricer.round_to(self.config.round_to)
        self.adjustment = fit_budget(
            fit_units(units, scores),
            self.pricer.cost,
            self.target,
            low,
            start=self.learned_masks(),
            round_to=self.round_to,
            floor=floor_of(self.config.min_keep, self.budget.metric, ("flops", "latency")),
        )
        self.min_keep = self.adjustment.floor
        self.pricer.save()
        self.masks = self.adjustment.masks
        for unit, mask in zip(units, self.masks):
            z = self.gates.test_values(unit).detach()
            one = torch.ones_like(z)
            kept = torch.where(z > 0, z, one) if self.config.fold_gates else one
            unit.frozen = torch.where(mask, kept, 0.0)

    # --- the schedule of phases -------------------------------------------------------------

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """Phase 1 with gates (a latency re-fit starts after it: `start_from`); the decision
        and slimming; phases 2 and 3 on the slimmed net."""
        cfg = self.config
        # without labels the dense model's soft targets and pseudo-labels replace them
        loader = self.training_data(data, cfg.batch_size, cfg.temperature, cfg.alpha)
        distill = self.teacher()
        self.prepare(data.sample_inputs(2).to(device_of(self.model)))
        lr, decay = (0.0, 0.0) if cfg.freeze_weights else (cfg.lr, cfg.weight_decay)
        optimizer = sgd(self.model.parameters(), lr, cfg.momentum, decay)
        loss = task_loss_of(distill, self.penalty)
        epochs = cfg.epochs if cfg.gate_steps is None else epochs_for(cfg.gate_steps, loader)
        gates = Phase("bar: gates", self.model, epochs, loader, optimizer, loss, None, self.step)
        gates.steps = cfg.gate_steps  # phase 1 in steps, not epochs
        with fixed_weights(self.model, cfg.freeze_weights):  # no weight gradients computed
            yield from self.trained_phase(gates)  # a latency re-fit restores it instead
        self.slim()
        yield slimmed_finetune_phase(self.model, loader, cfg, distill)
