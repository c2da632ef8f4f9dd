"""ProbMask: probabilistic masks trained under one global sparsity constraint (METHODS.md §2).

Zhou et al., "Effective Sparsification of Neural Networks with Global Sparsity Constraint"
(CVPR 2021); defaults follow the official code (x-zho14/ProbMask-official).

Every prunable weight w_i gets a probability s_i in [0, 1] (stored directly, not as a
logit). Training multiplies the weight by a relaxed Bernoulli sample

    m = sigmoid((log s - log(1 - s) + g) / tau),   g = -log(log u0 / log u1),

K samples per batch, and after every optimiser step projects s onto
{0 <= s <= 1, sum(s) <= k n} with n the prunable weights of the whole network, so layers
compete for one budget. `finalize()` turns s into a discrete mask (exact top-k by
default), optionally fine-tunes with the mask fixed, and strips the scores.

Where this differs from the official code, it says why: g is drawn as logit(u), the same
distribution from one uniform (`logistic_noise`); the schedules advance every step, not
every epoch, because our runs last a few epochs; v is solved exactly rather than by 20
bisections to within 1e-3; BatchNorm statistics are re-estimated once the mask is fixed.
The loss is cross-entropy, as official (no distillation: GMP, the baseline, uses the
same loss, so the comparison isolates how weights are chosen).

Choices of ours, for a trained model (the usual case; `from_scratch=True` restores the
paper's start exactly): the scores start as a soft global magnitude ranking already at
the target, s = sigmoid(sharpness (log|w| - c)) with c such that sum(s) = k n
(probmask/warm.py), and the keep fraction is the target from the first step. Why: the
paper's scores start at 1 and the projection lowers them all alike while their gradients
on a converged model are noise, so a short run trains a randomly thinned network (digits
LeNet-5 at 90 % with 1 + 1 epochs: 51 % against 88 % for magnitude-global + the same
fine-tuning, and a collapsed MNIST CNN at 2 + 1). Warm, the probabilities rank as
magnitude-global and training only moves the weights near the threshold. A ramp of k
from 1 would spread the budget uniformly again (46 % in the same test, seed 0), so there
is none. The scores' Adam lr is `warm_score_lr` (0.05): the official 6e-3 is sized for
~60k steps. On runs longer than `warm_score_steps` (200) it falls as 200 / steps, so the
scores move as far in all: on full Fashion-MNIST (844 steps per epoch) 0.05 let noisy
gradients reshuffle the ranking (LeNet-5 95 %, 2 + 1 epochs: 88.7 % against 91.0 % for
magnitude + fine-tuning); 0.005 gave 91.0 %, 5e-4 90.9 %. The weight lr stays 0.01, a
tenth of the official (1e-3 was no better). The final mask is the global top-k of s, ties
by |w| (unchanged); measurements in probmask/warm.py.

With `--pattern` (compressor/pattern_masks.py) the scores train per weight as above and
the discrete mask ranks groups: a block's score is the sum of its s (its expected kept
count under the Bernoulli masks), blocks ranked over all layers to the budget in whole
blocks, ties by the block's summed |w|; an N:M group keeps its N largest s, on the layers
whose N:M mask drops the least s per pruned weight. Sampling one Bernoulli per unit while
training would be the faithful pattern version; we do not (the per-weight projection and
its exact budget stay as they are), and "threshold" / "best-of-n" masks, which sample or
cut per weight, are refused with a pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from compressor.errors import InputError
from compressor.masks import apply_masks_, strip_, weight_of
from compressor.methods.base import Method, MethodConfig, Result, register_method
from compressor.methods.phases import Phase, device_of, masked_finetune_phase
from compressor.methods.probmask.relax import (
    keep_fraction,
    logistic_noise,  # noqa: F401  (public: tests and notebooks import it from here)
    project_scores_,
    relaxed_masked_weight,
    temperature,
)
from compressor.methods.probmask.warm import check_sharpness, warm_start_
from compressor.outputs import select_output
from compressor.pattern_masks import select_masks
from compressor.train import recalibrate_batchnorm_, sgd_cosine, task_loss

if TYPE_CHECKING:
    from collections.abc import Iterator

    from compressor.data import Data

MASK_CHOICES = ("topk", "threshold", "best-of-n")
# BatchNorm statistics gathered under sampled masks do not match the final discrete mask;
# re-estimating them on this many batches is cheap and enough for a stable average.
BN_BATCHES = 100


@dataclass(frozen=True)
class ProbMaskConfig(MethodConfig):
    """ProbMask hyper-parameters; each default names its source."""

    # Official: 300 epochs from scratch on CIFAR. We start from a trained model, where a
    # short run suffices; 10 epochs is a sensible default, the benchmark states its own.
    epochs: int = 10
    # Official: 20 epochs with the mask fixed after 300 (about 7 %). Our runs are short and
    # end at tau = 0.03, where samples are nearly discrete, so 2 epochs recover BN/weights.
    finetune_epochs: int = 2
    finetune_lr: float = 1e-3  # official: SGD lr 0.001 (constant), momentum 0.9, wd 5e-4
    mask_samples: int = 2  # official K = 2 masks per batch, loss averaged
    # from_scratch only; official: Adam lr 0.006, cosine, weight decay 0 on scores
    score_lr: float = 6e-3
    # Official weight lr is 0.1 from scratch (cosine). Fine-tuning a trained model with that
    # would undo it; 0.01 (a tenth, the usual fine-tuning ratio) is the default here.
    lr: float = 0.01
    momentum: float = 0.9  # official SGD momentum for weights
    weight_decay: float = 5e-4  # official SGD weight decay for weights
    tau_start: float = 1.0  # official: temperature 1 at the start ...
    tau_end: float = 0.03  # ... falling linearly to 0.03 at the end of training
    # from_scratch only (warm, k is the target throughout):
    keep_start: float = 0.16  # official ts: keep fraction k = 1 before 0.16 E ...
    keep_end: float = 0.6  # official te: ... cubic to the target until 0.6 E, then constant
    score_init: float = 1.0  # from_scratch only; official score_init_constant: all kept
    clip_grad: float = 3.0  # official: clip_grad_norm_(model.parameters(), 3)
    eps: float = 1e-20  # official eps inside the logs of the relaxation
    # Discrete mask: "topk" (exact target; our default), "threshold" (s >= 0.5), or
    # "best-of-n" (official: `mask_draws` Bernoulli(s) masks, best training accuracy).
    mask: str = "topk"
    mask_draws: int = 10  # official: 10 Bernoulli draws for best-of-n
    # Official scores each draw on the whole training set; a fixed number of training
    # batches keeps best-of-n affordable on a CPU.
    select_batches: int = 50
    batch_size: int = 64  # the toolkit's loader default (official 256 on a GPU)
    # False (a trained model, the usual case): scores start as a soft global magnitude
    # ranking at the target keep fraction (probmask/warm.py); True: the paper's start
    # (every score `score_init`, keep schedule from 1), for a model trained from scratch.
    from_scratch: bool = False
    # warm start: s = sigmoid(sharpness * (log|w| - c)); 8 puts a weight at twice the
    # threshold's magnitude at s = 0.996 and one at half of it at 0.004 (4 and 2: worse)
    warm_sharpness: float = 8.0
    # warm start: the scores' Adam lr (cosine). The official 6e-3 is sized for ~60k steps
    # and barely moves warm scores in a short run; on digits (18 steps per epoch) 0.05-0.1
    # gained 1-3 points over 6e-3 and 0.02 (probmask/warm.py)
    warm_score_lr: float = 0.05
    # ... for runs of up to this many score steps; a longer run scales it by
    # warm_score_steps / steps, so the scores move as far in all: at 0.05 on 1688 steps
    # (2 epochs of Fashion-MNIST) noisy gradients reshuffled the magnitude ranking and
    # LeNet-5 at 95 % lost 2.3 points to magnitude + fine-tuning; 0.005 tied it
    warm_score_steps: int = 200


class ProbMaskScores(nn.Module):
    """Parametrization `W -> W * m` with m a relaxed sample of Bernoulli(scores).

    In eval mode the mask is `scores >= 0.5`; once `fixed` is set, that mask is used.
    """

    def __init__(self, shape: torch.Size, init: float, eps: float, device=None):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, float(init), device=device))
        self.tau = 1.0
        self.eps = eps
        self.fixed: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return weight * self.fixed
        if self.training:
            return relaxed_masked_weight(weight, self.scores, self.tau, self.eps)
        return weight * (self.scores >= 0.5)


@register_method("probmask")
class ProbMask(Method):
    """ProbMask (METHODS.md §2): scores, projection, schedules, discrete mask, fine-tune."""

    Config = ProbMaskConfig
    needs = "labels"
    # digits gives 18 steps per epoch; K = 1 halves them (the warm start's score lr is
    # already sized for short runs; a --from-scratch demo wants --set score_lr=0.1)
    demo_config = {"epochs": 4, "finetune_epochs": 1, "mask_samples": 1}
    smoke_config = {"epochs": 1, "finetune_epochs": 1, "mask_samples": 1}

    def __init__(self, model, budget, config=None, **overrides):
        super().__init__(model, budget, config, **overrides)
        if self.config.mask not in MASK_CHOICES:
            raise InputError(f"mask {self.config.mask!r}: choose one of {', '.join(MASK_CHOICES)}")
        check_sharpness(self.config.warm_sharpness)
        if self.config.warm_score_steps < 1:
            raise InputError(
                f"warm_score_steps {self.config.warm_score_steps} must be at least 1; "
                "e.g. 200 (the default)"
            )
        if self.pattern is not None and self.config.mask != "topk":
            raise InputError(
                f"mask {self.config.mask!r} decides weight by weight; with --pattern "
                f"{self.config.pattern} use mask=topk (the default), which ranks whole groups"
            )
        if self.config.mask_samples < 1:
            raise InputError(f"mask_samples {self.config.mask_samples} must be at least 1")
        self.probs: dict[str, ProbMaskScores] = {}
        self.score_optimizer: torch.optim.Optimizer | None = None
        self.tau = self.config.tau_start
        self.summary: dict | None = None  # the scores' summary, once the mask is fixed
        self.score_steps = 0  # steps of the score phase, once phases() knows its loader
        self.draws: list = []  # best-of-n's training accuracy per draw

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self) -> None:
        """Installs one score per prunable weight (W -> W * m) and the scores' Adam."""
        for fqn, module in self.layers.items():
            weight = weight_of(module)
            prob = ProbMaskScores(
                weight.shape, self.config.score_init, self.config.eps, weight.device
            )
            parametrize.register_parametrization(module, "weight", prob)
            self.probs[fqn] = prob
        if not self.config.from_scratch:
            keep, sharpness = self.scheduled_keep(0.0), self.config.warm_sharpness
            warm_start_(self.probs, self.layers, keep, sharpness)
        self.set_temperature(self.config.tau_start)
        # fused: one kernel per step instead of ~10 passes over n (same arithmetic)
        self.score_optimizer = torch.optim.Adam(
            self.score_parameters(), lr=self.score_lr(), fused=True
        )

    def score_parameters(self) -> list[nn.Parameter]:
        """The scores s (one per prunable weight); stepped by `step()`, not by the caller."""
        return [p.scores for p in self.probs.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every model parameter except the scores: what the caller's optimiser trains."""
        scores = {id(s) for s in self.score_parameters()}
        return [p for p in self.model.parameters() if id(p) not in scores]

    def step(self, progress: float) -> None:
        """After the weights' optimiser step: Adam on s, global projection, schedules."""
        cfg = self.config
        if self.score_optimizer is not None:
            for group in self.score_optimizer.param_groups:
                # official: cosine decay of the scores' Adam lr over training
                group["lr"] = self.score_lr() * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            self.score_optimizer.step()
            self.score_optimizer.zero_grad(set_to_none=True)
        keep = self.scheduled_keep(progress)
        project_scores_(self.score_parameters(), keep)
        self.set_temperature(temperature(progress, cfg.tau_start, cfg.tau_end))

    def score_lr(self) -> float:
        """The scores' Adam lr before its cosine decay: the official one, or the warm one
        (scaled down for runs longer than `warm_score_steps`)."""
        cfg = self.config
        if cfg.from_scratch:
            return cfg.score_lr
        return cfg.warm_score_lr * min(1.0, cfg.warm_score_steps / max(1, self.score_steps))

    def scheduled_keep(self, progress: float) -> float:
        """The keep fraction k at `progress`: the paper's schedule, or the target when warm."""
        cfg = self.config
        if cfg.from_scratch:
            return keep_fraction(progress, self.budget.keep, cfg.keep_start, cfg.keep_end)
        # warm: the scores already start at the target; a ramp from k = 1 would lower every
        # score alike, as from scratch, and lost 40 points on digits (probmask/warm.py)
        return self.budget.keep

    def set_temperature(self, tau: float) -> None:
        self.tau = tau
        for prob in self.probs.values():
            prob.tau = tau

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """Weights and scores trained jointly; the discrete mask and BatchNorm re-estimated;
        the weights fine-tuned under the fixed mask."""
        cfg = self.config
        loader = self.training_data(data, cfg.batch_size)
        self.score_steps = cfg.epochs * len(loader)
        self.prepare()
        optimizer, scheduler = sgd_cosine(
            self.weight_parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            total_steps=cfg.epochs * len(loader),
        )
        loss, clip = self.sampled_loss, cfg.clip_grad
        yield Phase(
            "probmask", self.model, cfg.epochs, loader, optimizer, loss, scheduler, self.step, clip
        )
        self.fix_mask(loader)
        yield masked_finetune_phase(self.model, loader, cfg, self.soft_targets)

    def fix_mask(self, loader: DataLoader | None = None) -> None:
        """Replaces the scores by the discrete mask; re-estimates BatchNorm on `loader`.

        Args:
            loader: labelled training data; needed for "best-of-n" and the BatchNorm
                re-estimation (`phases()` passes it; without it the latter is skipped).
        """
        self.summary = self._score_summary()
        masks, self.draws = self.choose_masks(loader)
        apply_masks_(self.layers, masks)  # replaces the scores' parametrization
        self.probs, self.score_optimizer = {}, None
        if loader is not None:
            recalibrate_batchnorm_(self.model, loader, max_batches=BN_BATCHES)

    def finalize(self) -> Result:
        """Fixes the discrete mask (unless `phases()` has) and strips all machinery."""
        if self.summary is None:
            self.fix_mask()
        strip_(self.model)
        self.model.eval()
        report = self.base_report()
        report["probmask"] = self.summary | {
            "mask": self.config.mask,
            "draw_train_top1": self.draws,
            "score_lr": self.score_lr(),  # before its cosine decay; warm: scaled by the steps
        }
        return Result(self.model, report)

    # --- training ----------------------------------------------------------------------

    def sampled_loss(self, net: nn.Module, batch: tuple) -> torch.Tensor:
        """The task loss averaged over K sampled masks (official: K = 2 per batch).

        One graph for the K forwards, so a data-parallel run averages gradients once, in
        its one backward; memory grows with K, the gradient is the same average.
        """
        x, y = batch
        samples = self.config.mask_samples
        loss = torch.zeros(())
        for _ in range(samples):
            loss = loss + task_loss(net(x), y, x, self.soft_targets) / samples
        return loss

    def state_dict(self) -> dict:
        """The scores' Adam and the temperature (the scores are model parameters)."""
        optimizer = self.score_optimizer
        return {
            "score_optimizer": optimizer.state_dict() if optimizer is not None else None,
            "tau": self.tau,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.score_optimizer is not None and state["score_optimizer"] is not None:
            self.score_optimizer.load_state_dict(state["score_optimizer"])
        self.set_temperature(state["tau"])

    # --- the discrete mask -------------------------------------------------------------

    def choose_masks(self, loader: DataLoader | None) -> tuple[dict[str, torch.Tensor], list]:
        """The discrete mask per layer by `config.mask`, and best-of-n's draw accuracies."""
        scores = {fqn: p.scores.detach() for fqn, p in self.probs.items()}
        if self.config.mask == "threshold":
            return {fqn: s >= 0.5 for fqn, s in scores.items()}, []
        if self.config.mask == "best-of-n":
            if loader is None:
                raise InputError("mask 'best-of-n' needs training data to pick the best draw")
            return self._best_of_n(scores, loader)
        return self._topk(scores), []

    def _topk(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Exactly round(keep * n) weights with the largest s; ties go to larger |w|."""
        magnitudes = {f: weight_of(self.layers[f]).detach().abs() for f in scores}
        count = round(self.budget.keep * sum(s.numel() for s in scores.values()))
        return select_masks(self, scores, count, self.floors(count), tiebreak=magnitudes)

    @torch.no_grad()
    def _best_of_n(self, scores: dict[str, torch.Tensor], loader: DataLoader):
        best, best_top1, draws = None, -1.0, []
        for _ in range(self.config.mask_draws):
            masks = {f: torch.rand_like(s) < s for f, s in scores.items()}
            for fqn, prob in self.probs.items():
                prob.fixed = masks[fqn]
            draws.append(self._train_top1(loader))
            if draws[-1] > best_top1:
                best, best_top1 = masks, draws[-1]
        return best, draws

    def _train_top1(self, loader: DataLoader) -> float:
        """Training accuracy with batch statistics (as official), on `select_batches` batches."""
        self.model.train()
        device = device_of(self.model)
        correct = count = 0
        for i, (x, y) in enumerate(loader):
            if i >= self.config.select_batches:
                break
            x, y = x.to(device), y.to(device)
            correct += int((select_output(self.model(x)).argmax(dim=1) == y).sum())
            count += len(y)
        return correct / max(count, 1)

    def _score_summary(self) -> dict:
        flat = torch.cat([s.detach().flatten() for s in self.score_parameters()])
        undecided = ((flat > 0.05) & (flat < 0.95)).float().mean()
        return {
            "score_sum": float(flat.sum(dtype=torch.float64)),
            "undecided_fraction": float(undecided) if flat.numel() else math.nan,
        }
