"""Per-layer parameters, MACs, activation volume and sparsity, measured on a sample input.

Forward hooks on the leaf modules see each layer's real input and output shapes, so the
counts are right for any model, including slimmed and lifted ones. FLOPs are counted as
multiply-accumulates (MACs) per sample, the convention of the pruning literature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compressor.masks import PRUNABLE_TYPES, prunable_layers, weight_of

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class LayerStats:
    """Measured cost of one layer, per sample."""

    fqn: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    flops: int  # MACs
    volume: int  # elements of the layer's output feature map
    channels: int  # output channels (features for Linear)
    kept_channels: int  # output channels with any nonzero weight
    memory: int = 0  # elements moved by gather/scatter (mixed residual joins), not MACs

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0


@dataclass
class ModelStats:
    """Per-layer stats and totals over the whole model."""

    layers: list[LayerStats]
    params: int  # every parameter of the model
    nonzero: int
    prunable_params: int  # weights of Conv/Linear layers
    prunable_nonzero: int
    flops: int
    volume: int  # activation volume: sum of prunable layers' output sizes
    memory: int = 0  # elements moved by gather/scatter ops (slimmed mixed residual joins)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights among the prunable weights."""
        if not self.prunable_params:
            return 0.0
        return 1.0 - self.prunable_nonzero / self.prunable_params

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        out["sparsity"] = self.sparsity
        out["layers"] = [asdict(layer) | {"sparsity": layer.sparsity} for layer in self.layers]
        return out


def _conv_macs(module: nn.Module, out: torch.Tensor) -> int:
    kernel = weight_of(module)[0].numel()  # (in / groups) * kh * kw
    return int(out[0].numel() * kernel)


def _linear_macs(module: nn.Linear, out: torch.Tensor) -> int:
    return int(out[0].numel() * module.in_features)


def _layer_stats(fqn: str, module: nn.Module, out: torch.Tensor) -> LayerStats:
    weight = weight_of(module).detach()
    params = weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    nonzero_w = int(torch.count_nonzero(weight))
    bias_nz = int(torch.count_nonzero(module.bias)) if module.bias is not None else 0
    flops = _linear_macs(module, out) if isinstance(module, nn.Linear) else _conv_macs(module, out)
    rows = weight.reshape(weight.shape[0], -1)
    return LayerStats(
        fqn=fqn,
        kind=type(module).__name__,
        shape=tuple(weight.shape),
        params=params,
        nonzero=nonzero_w + bias_nz,
        flops=flops,
        volume=int(out[0].numel()),
        channels=weight.shape[0],
        kept_channels=int((rows != 0).any(dim=1).sum()),
    )


def _is_param(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


def _norm_stats(fqn: str, module: nn.Module, out: torch.Tensor) -> LayerStats:
    params = sum(p.numel() for p in module.parameters(recurse=False))
    nonzero = sum(int(torch.count_nonzero(p)) for p in module.parameters(recurse=False))
    channels = out.shape[1] if out.dim() > 1 else out.numel()
    return LayerStats(
        fqn, type(module).__name__, (channels,), params, nonzero, 0, 0, channels, channels
    )


@torch.no_grad()
def measure(model: nn.Module, example: torch.Tensor | tuple) -> ModelStats:
    """Measures `model` on one forward pass of `example` (batch dim first; counts per sample).

    The model is put in eval mode for the pass and restored afterwards.
    """
    found: list[LayerStats] = []
    hooks = []
    for fqn, module in model.named_modules():
        if _is_param(module):
            hooks.append(module.register_forward_hook(_hook(fqn, _layer_stats, found)))
        elif isinstance(module, _NORMS):
            hooks.append(module.register_forward_hook(_hook(fqn, _norm_stats, found)))
        elif hasattr(module, "memory_elements"):
            hooks.append(module.register_forward_hook(_memory_hook(fqn, found)))
    modes = training_modes(model)
    model.eval()
    try:
        model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        restore_modes(model, modes)
        for hook in hooks:
            hook.remove()
    return _totals(model, _dedupe(found))


def training_modes(model: nn.Module) -> dict[str, bool]:
    """Each submodule's training flag (a frozen BatchNorm may be in eval inside a train model)."""
    return {fqn: m.training for fqn, m in model.named_modules()}


def restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Puts back the flags `training_modes` recorded; `model.train(flag)` would flatten them."""
    for fqn, module in model.named_modules():
        module.training = modes.get(fqn, module.training)


def _hook(fqn, fn, found):
    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        found.append(fn(fqn, module, out))

    return hook


def _memory_hook(fqn, found):
    """Index ops (e.g. surgery's ResidualJoin) report the elements they move per sample."""

    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        moved = module.memory_elements(inputs, out)
        found.append(LayerStats(fqn, type(module).__name__, (), 0, 0, 0, 0, 0, 0, memory=moved))

    return hook


def _dedupe(found: list[LayerStats]) -> list[LayerStats]:
    """A layer called twice (weight sharing) counts its MACs twice but its params once."""
    merged: dict[str, LayerStats] = {}
    for stat in found:
        if stat.fqn in merged:
            merged[stat.fqn].flops += stat.flops
            merged[stat.fqn].volume += stat.volume
            merged[stat.fqn].memory += stat.memory
        else:
            merged[stat.fqn] = stat
    return list(merged.values())


def _totals(model: nn.Module, layers: list[LayerStats]) -> ModelStats:
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    prunable = [weight_of(m).detach() for m in model.modules() if _is_param(m)]
    return ModelStats(
        layers=layers,
        params=params,
        nonzero=nonzero,
        prunable_params=sum(w.numel() for w in prunable),
        prunable_nonzero=sum(int(torch.count_nonzero(w)) for w in prunable),
        flops=sum(layer.flops for layer in layers),
        # only Conv/Linear rows carry a volume; matching on isinstance (not the class name)
        # keeps their subclasses, e.g. surgery's SelectedLinear, in the count
        volume=sum(layer.volume for layer in layers),
        memory=sum(layer.memory for layer in layers),
    )


def sparsity_of(model: nn.Module, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """(zeros, total) over the prunable weights of `model`."""
    weights = [weight_of(m).detach() for m in prunable_layers(model, exclude).values()]
    total = sum(w.numel() for w in weights)
    zeros = total - sum(int(torch.count_nonzero(w)) for w in weights)
    return zeros, total
