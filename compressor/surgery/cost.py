"""The cost engine's predictor: params, FLOPs and activation volume of a keep decision.

`CostModel` predicts what `compressor.stats.measure` will count on the network `slim_`
builds from a keep dict, without slimming. Which positions survive at each value comes from
the same plan `slim_` executes (`plan.make_plan`), so mixed residual streams (a consumer
reads the union of the channels its stream's producers keep) are priced as they will be
built. From the live width of every Conv/Linear dimension:

- params: every tensor a member slices, at its live shape (weights, biases, norm affines,
  per-channel tensors), plus the model's untouched parameters;
- FLOPs (MACs): live outputs x output area x the live size of one weight row, per call;
- volume: live outputs x output area of every Conv/Linear.

All three are integers, equal to `measure` on the slimmed model when removed channels carry
no constant into a layer without a bias (the structured methods zero the norms first, so
`slim_` never has to create a bias to fold one).

Input-feature groups (`select.with_input_features`, ids after the analysis' groups) are
priced too: removing feature k of such a group shrinks its Linear's input width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import InputError
from compressor.masks import PRUNABLE_TYPES
from compressor.stats import measure
from compressor.surgery.graph import PRODUCING, Analysis, ChannelGroup, analyse
from compressor.surgery.plan import make_plan

COST_METRICS = ("params", "flops", "volume")
MEMO_SIZE = 4096  # cached decisions (a few KB each)


@dataclass
class LayerCost:
    """Dense per-sample costs of one Conv/Linear layer, summed over its calls."""

    fqn: str
    shape: tuple[int, ...]  # the weight's dense shape
    out_dim: int  # the weight dimension along the layer's outputs (1 for ConvTranspose)
    grouped: bool  # groups > 1: inputs follow outputs group by group
    area: int  # output elements per output channel, summed over the layer's calls
    bias: bool

    @property
    def out_channels(self) -> int:
        return self.shape[self.out_dim] if not self.grouped else self.shape[0]


@dataclass
class Widths:
    """Live weight shape of every Conv/Linear, and live size of every sliced 1-D tensor."""

    weights: dict[str, list[int]]
    outputs: dict[str, int]
    tensors: dict[str, int] = field(default_factory=dict)  # param path -> live numel


class CostModel:
    """Params, MACs and activation volume of `model` slimmed with any keep dict, per sample.

    Args:
        model: The network (not modified); its parameters are read once.
        example_inputs: A tuple of inputs (batch first) the model runs on.
        residual: "tied" or "mixed": how `slim_` will build residual streams.
        groups: The channel groups the keep dicts name, when they extend the analysis'
            (input-feature groups from `select.with_input_features`); default: the analysis'.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple,
        residual: str,
        groups: list[ChannelGroup] | None = None,
        analysis: Analysis | None = None,
    ):
        stats = measure(model, example_inputs)
        self.analysis = analysis if analysis is not None else analyse(model, example_inputs)
        self.residual = residual
        self.groups = list(groups) if groups is not None else self.analysis.groups
        self.features = [g for g in self.groups if g.id >= len(self.analysis.groups)]
        self.layers: dict[str, LayerCost] = {}
        for row in stats.layers:
            module = model.get_submodule(row.fqn)
            if isinstance(module, PRUNABLE_TYPES):
                self.layers[row.fqn] = _layer_cost(row.fqn, module, row.volume)
        self.tensor_paths = _sliced_tensors(model, self.analysis)
        self.tensor_sizes = {p: n for paths in self.tensor_paths.values() for p, n in paths.items()}
        self.fixed_params = (
            stats.params
            - sum(
                _numel(layer.shape) + (layer.out_channels if layer.bias else 0)
                for layer in self.layers.values()
            )
            - sum(self.tensor_sizes.values())
        )
        self.dense_costs = {"params": stats.params, "flops": stats.flops, "volume": stats.volume}
        self._memo: dict[tuple, dict[str, int]] = {}

    def dense(self, metric: str) -> int:
        """The dense model's cost in `metric` (one of COST_METRICS)."""
        _check_metric(metric)
        return self.dense_costs[metric]

    def widths(self, keep: dict, residual: str | None = None) -> Widths:
        """Live shapes once slimmed with `keep`; `residual` overrides the model's mode."""
        analysis_keep = {k: v for k, v in keep.items() if not self._is_feature(k)}
        plan = make_plan(self.analysis, analysis_keep, residual or self.residual)
        weights = {fqn: list(layer.shape) for fqn, layer in self.layers.items()}
        outputs = {fqn: layer.out_channels for fqn, layer in self.layers.items()}
        tensors = dict(self.tensor_sizes)
        for use in self.analysis.uses:
            if use.key not in plan.physical:
                continue
            count = int(plan.physical[use.key].sum())
            if use.fqn in self.layers:
                layer = self.layers[use.fqn]
                if use.kind in PRODUCING:
                    weights[use.fqn][use.dim] = count
                    outputs[use.fqn] = count
                elif use.kind == "consumer" and not layer.grouped:
                    weights[use.fqn][use.dim] = count
            elif use.kind in ("norm", "channelwise"):
                for path in self.tensor_paths.get(use.fqn, ()):
                    tensors[path] = self.tensor_sizes[path] // len(use.ids) * count
        for group in self.features:
            if group.id in keep:
                mask = _as_mask(keep[group.id], group.size)
                for member in group.consumers:
                    weights[member.fqn][member.dim] = int(member.positions(mask).sum())
        return Widths(weights, outputs, tensors)

    def predict(self, keep: dict, residual: str | None = None) -> dict[str, int]:
        """{"params", "flops", "volume"} of the slimmed network, exactly as `measure` counts.

        Memoised: a fitter prices the same decision again and again, and a plan costs
        milliseconds on a ResNet-56.
        """
        key = tuple(sorted((str(k), torch.as_tensor(v).numpy().tobytes()) for k, v in keep.items()))
        key += (residual,)
        if key not in self._memo:
            if len(self._memo) > MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = self._predict(keep, residual)
        return self._memo[key]

    def cost(self, keep: dict, metric: str, residual: str | None = None) -> int:
        """The slimmed network's cost in one metric."""
        _check_metric(metric)
        return self.predict(keep, residual)[metric]

    def _predict(self, keep: dict, residual: str | None) -> dict[str, int]:
        widths = self.widths(keep, residual)
        params, flops, volume = self.fixed_params + sum(widths.tensors.values()), 0, 0
        for fqn, layer in self.layers.items():
            shape, outs = widths.weights[fqn], widths.outputs[fqn]
            params += _numel(shape) + (outs if layer.bias else 0)
            flops += outs * layer.area * _numel(shape[1:])
            volume += outs * layer.area
        return {"params": params, "flops": flops, "volume": volume}

    def _is_feature(self, key) -> bool:
        return isinstance(key, int) and key >= len(self.analysis.groups)


def _layer_cost(fqn: str, module: nn.Module, volume: int) -> LayerCost:
    shape = tuple(module.weight.shape)
    transpose = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    out_dim = 1 if transpose else 0
    grouped = getattr(module, "groups", 1) > 1
    outs = shape[0] if grouped else shape[out_dim]
    # per-call areas add up: a shared layer is measured once per call
    return LayerCost(fqn, shape, out_dim, grouped, volume // outs, module.bias is not None)


def _sliced_tensors(model: nn.Module, analysis: Analysis) -> dict[str, dict[str, int]]:
    """Per norm / per-channel member, the dense numel of each parameter it slices, by path."""
    found: dict[str, dict[str, int]] = {}
    for use in analysis.uses:
        if use.kind not in ("norm", "channelwise") or use.fqn in found:
            continue
        try:
            found[use.fqn] = {use.fqn: model.get_parameter(use.fqn).numel()}  # a bare tensor
            continue
        except AttributeError:
            pass
        try:
            module = model.get_submodule(use.fqn)
        except AttributeError:
            continue  # a buffer: not a parameter, measure does not count it
        params = module.named_parameters(recurse=False)
        found[use.fqn] = {f"{use.fqn}.{name}": p.numel() for name, p in params}
    return found


def _numel(shape) -> int:
    return math.prod(shape)


def _as_mask(value, size: int) -> torch.Tensor:
    mask = torch.as_tensor(value)
    if mask.dtype == torch.bool:
        return mask
    out = torch.zeros(size, dtype=torch.bool)
    out[mask.long()] = True
    return out


def _check_metric(metric: str) -> None:
    if metric not in COST_METRICS:
        raise InputError(f"unknown cost metric {metric!r}; use one of {', '.join(COST_METRICS)}")
