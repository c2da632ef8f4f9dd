"""SparseGPT: one-shot second-order post-training sparsity (Frantar & Alistarh, ICML 2023).

Every prunable layer is pruned by an approximate OBS reconstruction on unlabelled
calibration inputs (see `sparsegpt.solve` for the math): with `H = X X^T` of the
layer's inputs, the weights of lowest `w^2 / [U]_jj^2` in each block of 128 columns are
zeroed and their error is compensated on the columns not yet visited. Layers are pruned
one after another in the order the forward pass calls them, each on the inputs the
already-pruned model gives it (the paper's sequential mode). BatchNorm statistics are
re-estimated on the calibration data at the end, as FCPTS does.

Choices of ours, where the paper is silent or does otherwise:

* Exact target. The paper prunes a fraction per block by threshold (ties and rounding
  make the count approximate); here the global count `round(r0 * N)` is split over the
  layers by largest remainder (uniform sparsity, as the paper) and each layer's count
  over its blocks the same way, and each block prunes exactly its count (ties by position).
* Dead inputs (`H_jj == 0`). Official code zeroes all their weights, which can overshoot
  the count; we prune them first in their block (their output error on the calibration
  data is zero) and keep, unchanged, those the count does not reach.
* Convolutions are solved on their unfolded inputs, a grouped one as one matrix per group
  (a depthwise filter's kh*kw weights see only their own channel); the paper has none.
* A layer the forward pass never calls has no Hessian; it is solved with `H = I`, which
  is magnitude pruning, so the target stays exact. The report lists such layers.
* Sequential mode costs one forward pass per layer. When a first pass over the calibration
  data shows every layer called exactly once per forward (a plain feed-forward network),
  each layer's pass stops right after that layer; a model with shared or repeated layers
  runs whole passes. `sequential=False` takes every Hessian from the dense model in one pass.
* The solve runs in float64 (official: float32): the layers here are small, and it makes
  the updates agree with a brute-force OBS to rounding (4e-16 on the tests' layer).
* BatchNorm (absent from the paper's transformers) keeps the dense running statistics
  while the layers are solved and is re-estimated on the calibration data afterwards,
  with the helper FCPTS uses.
* `allocation="erk"` (not in the paper) takes FCPTS's starting per-layer counts instead of
  uniform sparsity; small CNNs, whose first and last layers are tiny, need it.
* Calibration: FCPTS's data (`--calib-samples`, default 1024 unlabelled images) instead of
  the paper's 128 text segments, so the two methods are compared on the same inputs.
* `--pattern` (compressor/pattern_masks.py). Each layer's mask is chosen once, before its
  solve, on the OBS saliency `w^2 / [U]_jj^2` of the weights it then has (dead inputs: 0):
  blocks by their summed saliency, to the layer's count in whole blocks; N:M groups keep
  their N most salient weights. The solve then reconstructs the kept weights with that
  fixed mask. (The paper picks N:M groups inside the lazy loop, on the weights the earlier
  columns' updates changed; ours sees them before any update of the layer.) Which layers
  carry N:M is chosen first, on the dense model's saliency `w^2 / [H^-1]_jj` (one extra
  calibration pass): least saliency removed per pruned weight first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from compressor.errors import CompressorError, InputError
from compressor.examples import calibration_inputs
from compressor.masks import weight_of
from compressor.methods.base import Method, MethodConfig, Result, register_method
from compressor.methods.magnitude import erk_counts, exact_counts
from compressor.methods.sparsegpt.solve import (
    block_zero_counts,
    grouped_weight,
    hinv_upper,
    layer_inputs,
    relative_error,
    sparsegpt_solve,
)
from compressor.pattern_masks import nm_layers, nm_zeros, pattern_masks
from compressor.patterns import nm_mask
from compressor.train import recalibrate_batchnorm_

if TYPE_CHECKING:
    from collections.abc import Iterator

    from compressor.data import Data
    from compressor.methods.phases import Phase

ALLOCATIONS = ("uniform", "erk")


@dataclass(frozen=True)
class SparseGptConfig(MethodConfig):
    """SparseGPT hyper-parameters (defaults: the paper and its official code)."""

    calib_samples: int = 1024  # ours: FCPTS's calibration set (paper: 128 x 2048 tokens)
    batch_size: int = 64  # calibration forward batch: memory only, the Hessian is a sum
    blocksize: int = 128  # paper/official: lazy-update and mask-selection blocks of 128
    percdamp: float = 0.01  # paper/official: 1 % of the mean Hessian diagonal as dampening
    sequential: bool = True  # paper: each layer sees the inputs of the already-pruned model
    allocation: str = "uniform"  # paper: the same sparsity per layer; "erk": FCPTS's start


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


@torch.no_grad()
def call_profile(
    model: nn.Module, layers: dict[str, nn.Module], inputs: torch.Tensor, batch_size: int
) -> tuple[list[str], bool]:
    """The layers in the order a forward first calls them, and whether every forward over
    `inputs` called every called layer exactly once (then a pass may stop after a layer)."""
    order: list[str] = []
    calls: dict[str, int] = {}
    once = True
    handles = [
        module.register_forward_pre_hook(
            lambda _m, _a, fqn=fqn: calls.__setitem__(fqn, calls.get(fqn, 0) + 1)
        )
        for fqn, module in layers.items()
    ]
    try:
        for x in inputs.split(batch_size):
            calls.clear()
            model(x)
            order += [fqn for fqn in calls if fqn not in order]
            once = once and all(count == 1 for count in calls.values())
    finally:
        for handle in handles:
            handle.remove()
    return order + [fqn for fqn in layers if fqn not in order], once


@torch.no_grad()
def hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    inputs: torch.Tensor,
    batch_size: int,
    stop: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Per layer, `H = X X^T` ([G, D, D], float64) over the calibration inputs.

    Forward hooks, not tracing, so any module works; a layer called several times per
    forward adds every call's inputs. None for a layer the forward never called. With
    `stop`, each forward ends right after the (single) layer's first call.
    """
    found: dict[str, torch.Tensor | None] = dict.fromkeys(layers)

    def accumulate(fqn: str, module: nn.Module, args: tuple) -> None:
        cols = layer_inputs(module, args[0].detach())
        gram = (cols @ cols.transpose(1, 2)).double()  # float32 per batch, as official
        found[fqn] = gram if found[fqn] is None else found[fqn] + gram
        if stop:
            raise _StopForward

    handles = [
        module.register_forward_pre_hook(lambda m, a, fqn=fqn: accumulate(fqn, m, a))
        for fqn, module in layers.items()
    ]
    try:
        for x in inputs.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


@register_method("sparsegpt")
class SparseGpt(Method):
    """Second-order one-shot pruning, layer by layer, to an exact global sparsity.

    `phases(data)` does the whole schedule (it has no training phase). By hand:
    `prune_(inputs)` with a tensor of calibration inputs, then `finalize()` (nothing is
    installed on the model, so there is nothing to strip) and re-estimate BatchNorm with
    `compressor.train.recalibrate_batchnorm_`.
    """

    Config: ClassVar[type[SparseGptConfig]] = SparseGptConfig
    needs: ClassVar[str] = "inputs"
    demo_config: ClassVar[dict] = {"calib_samples": 256}
    smoke_config: ClassVar[dict] = {"calib_samples": 64}

    def __init__(self, model, budget, config=None, **overrides):
        super().__init__(model, budget, config, **overrides)
        cfg = self.config
        if cfg.calib_samples < 1 or cfg.batch_size < 1 or cfg.blocksize < 1:
            raise InputError(
                f"calib_samples ({cfg.calib_samples}), batch_size ({cfg.batch_size}) and "
                f"blocksize ({cfg.blocksize}) must all be >= 1"
            )
        if cfg.allocation not in ALLOCATIONS:
            raise InputError(
                f"allocation {cfg.allocation!r} is not one of {', '.join(ALLOCATIONS)}"
            )
        if not cfg.percdamp >= 0:
            raise InputError(f"percdamp {cfg.percdamp!r} must be >= 0 (the paper uses 0.01)")
        self.sizes = {f: weight_of(m).numel() for f, m in self.layers.items()}
        self.solved: dict | None = None
        self.calibration = None  # the loader BatchNorm is re-estimated on (phases())

    def layer_zeros(self) -> dict[str, int]:
        """Zeros per layer at the configured allocation, summing to round(r0 * N) exactly."""
        if self.config.allocation == "erk":
            keep = erk_counts(self.layers, self.budget.sparsity, self.budget.keep)
        else:
            keep_total = round(self.budget.keep * sum(self.sizes.values()))
            uniform = dict.fromkeys(self.sizes, self.budget.keep)
            keep = exact_counts(uniform, self.sizes, keep_total)
        return {f: self.sizes[f] - keep[f] for f in self.sizes}

    def phases(self, data: Data | None) -> Iterator[Phase]:
        """No training phase: calibrates and prunes every layer; `finalize()` re-estimates
        BatchNorm on the calibration data."""
        cfg = self.config
        device = next(self.model.parameters()).device
        self.prune_(calibration_inputs(data, cfg.calib_samples, cfg.batch_size).to(device))
        self.calibration = data.calibration(cfg.calib_samples, cfg.batch_size)
        yield from ()

    @torch.no_grad()
    def prune_(self, inputs: torch.Tensor, zeros: dict[str, int] | None = None) -> None:
        """Prunes the model in place on calibration `inputs` (default: `layer_zeros()`)."""
        cfg = self.config
        training = self.model.training
        self.model.eval()
        if zeros is None and self.pattern is not None and self.pattern.kind == "nm":
            zeros = self.nm_layer_zeros(inputs)  # on the eval-mode model, as every pass here
        zeros = zeros if zeros is not None else self.layer_zeros()
        order, once = call_profile(self.model, self.layers, inputs, cfg.batch_size)
        errors, uncalibrated = {}, []
        if not cfg.sequential:  # every layer sees the dense model's inputs: one pass
            found = hessians(self.model, self.layers, inputs, cfg.batch_size)
        for fqn in order:
            if cfg.sequential:
                layer = {fqn: self.layers[fqn]}
                found = hessians(self.model, layer, inputs, cfg.batch_size, stop=once)
            hessian = found[fqn]
            if hessian is None:
                uncalibrated.append(fqn)
            errors[fqn] = self._solve_layer(self.layers[fqn], hessian, zeros[fqn])
        self.model.train(training)
        self.solved = {
            "calibration_samples": len(inputs),
            "layer_order": order,
            "relative_error": errors,
            "uncalibrated": uncalibrated,
        }

    def _solve_layer(self, module: nn.Module, hessian: torch.Tensor | None, zeros: int) -> float:
        """Prunes one layer to exactly `zeros` zeros; returns its relative output error."""
        weight = grouped_weight(module).double()
        groups, rows, columns = weight.shape
        if hessian is None:  # never called: H = I makes the solve magnitude pruning
            hessian = torch.eye(columns, dtype=torch.float64).expand(groups, -1, -1)
        hessian = hessian.to(weight.device)
        upper, dead = hinv_upper(hessian, self.config.percdamp)
        counts = block_zero_counts(groups, rows, columns, zeros, self.config.blocksize)
        fixed = None
        if self.pattern is not None:
            fixed = self._pattern_keep(module, weight, upper, dead, zeros)
            zeros = int((~fixed).sum())
        pruned, keep = sparsegpt_solve(
            weight,
            upper,
            counts.to(weight.device),
            blocksize=self.config.blocksize,
            dead=dead,
            keep=fixed,
        )
        if int((~keep).sum()) != zeros:  # a broken invariant, not a user error
            raise CompressorError(f"sparsegpt pruned {int((~keep).sum())} weights, not {zeros}")
        target = weight_of(module)
        target.copy_(pruned.reshape(target.shape).to(target.dtype))
        return relative_error(weight, pruned, hessian)

    def _pattern_keep(self, module, weight, upper, dead, zeros: int) -> torch.Tensor:
        """The layer's fixed keep mask ([G, O/G, D]) in units of the pattern, on the OBS
        saliency `w^2 / [U]_jj^2` of its current weights (dead inputs score 0)."""
        diag = torch.diagonal(upper, dim1=-2, dim2=-1).unsqueeze(1)
        saliency = torch.where(dead.unsqueeze(1), 0.0, weight**2 / diag**2)
        saliency = saliency.reshape(module.weight.shape)
        if self.pattern.kind == "nm":  # zeros > 0: the layer was chosen to carry N:M
            keep = nm_mask(saliency, self.pattern.a, self.pattern.b) if zeros else None
            keep = torch.ones_like(saliency, dtype=torch.bool) if keep is None else keep
        else:
            keep = pattern_masks({"": saliency}, self.pattern, saliency.numel() - zeros)[""]
        return keep.reshape(weight.shape)

    def nm_layer_zeros(self, inputs: torch.Tensor) -> dict[str, int]:
        """Zeros per layer when N:M goes on the layers that lose the least OBS saliency
        `w^2 / [H^-1]_jj` per pruned weight (dense model, one pass) to the budget."""
        found = hessians(self.model, self.layers, inputs, self.config.batch_size)
        saliency = {}
        for fqn, module in self.layers.items():
            weight = grouped_weight(module).double()
            hessian = found[fqn]
            if hessian is None:
                hessian = torch.eye(weight.shape[-1], dtype=torch.float64).expand(
                    weight.shape[0], -1, -1
                )
            upper, _ = hinv_upper(hessian.to(weight.device), self.config.percdamp)
            hinv_diag = upper.square().sum(dim=-2).unsqueeze(1)  # diag(U^T U) = diag(H^-1)
            saliency[fqn] = (weight**2 / hinv_diag).reshape(module.weight.shape)
        keep_total = round(self.budget.keep * sum(self.sizes.values()))
        chosen = nm_layers(saliency, self.pattern, sum(self.sizes.values()) - keep_total)
        return {
            f: nm_zeros(s.shape, self.pattern) if f in chosen else 0 for f, s in saliency.items()
        }

    def prepare(self, example_inputs: torch.Tensor | None = None) -> None:
        """Installs nothing; keeps `example_inputs` as calibration inputs for `finalize()`.

        A pipeline that drives the lifecycle itself passes its calibration batch here (or
        calls `prune_(inputs)`); `phases(data)` calibrates on the data.
        """
        self.example_inputs = example_inputs

    def finalize(self) -> Result:
        """The pruned model (no machinery was installed), BatchNorm re-estimated on the
        calibration data when `phases(data)` ran, and the report."""
        if self.solved is None and getattr(self, "example_inputs", None) is not None:
            self.prune_(self.example_inputs)
        if self.solved is None:
            raise CompressorError(
                "sparsegpt: give calibration inputs (prepare(inputs), prune_(inputs) or "
                "phases(data)) before finalize()"
            )
        if self.calibration is not None:
            recalibrate_batchnorm_(self.model, self.calibration)
        return Result(self.model, self.base_report() | self.solved)
