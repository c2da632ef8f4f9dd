"""Per-layer-type removal: one small function per kind of layer dimension.

Each function keeps the slices `keep_idx` of one dimension of one layer, in place, and updates
the layer's size attributes (`out_channels`, `in_features`, `num_features`, ...) so the module
stays self-consistent (its `repr`, `extra_repr` and re-export agree with its tensors). New
tensors replace the old ones, so an optimizer built before slimming must be rebuilt.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.errors import CompressorError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _slice(owner: nn.Module, name: str, dim: int, keep_idx: torch.Tensor) -> None:
    """Replace tensor `owner.name` by its slices `keep_idx` along `dim` (None stays None)."""
    old = getattr(owner, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, keep_idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner._buffers[name] = new  # a buffer (running stats) or a plain tensor attribute


def slice_outputs_(layer: nn.Module, dim: int, keep_idx: torch.Tensor) -> None:
    """Keep output channels `keep_idx` of a Conv / ConvTranspose / Linear (weight and bias)."""
    _slice(layer, "weight", dim, keep_idx)
    _slice(layer, "bias", 0, keep_idx)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep_idx)
    elif isinstance(layer, _CONV_TRANSPOSES):
        layer.out_channels = layer.weight.shape[1] * layer.groups
    else:
        layer.out_channels = len(keep_idx)


def slice_inputs_(layer: nn.Module, dim: int, keep_idx: torch.Tensor) -> None:
    """Keep input slices `keep_idx` of a Conv / ConvTranspose / Linear (weight columns)."""
    _slice(layer, "weight", dim, keep_idx)
    if isinstance(layer, nn.Linear):
        layer.in_features = len(keep_idx)
    else:
        layer.in_channels = len(keep_idx)


def slice_grouped_(conv: nn.Module, keep_idx: torch.Tensor) -> None:
    """Keep output channels `keep_idx` of a grouped / depthwise conv, whole groups at a time.

    `keep_idx` must cover whole conv groups (the channel graph ties each group into one unit);
    the conv keeps `len(keep_idx) / (out_channels / groups)` groups.
    """
    per_group = conv.out_channels // conv.groups
    if len(keep_idx) % per_group:
        raise CompressorError(f"grouped conv keeps a partial group: {len(keep_idx)} channels")
    in_per_group = conv.in_channels // conv.groups
    _slice(conv, "weight", 0, keep_idx)
    _slice(conv, "bias", 0, keep_idx)
    conv.groups = len(keep_idx) // per_group
    conv.out_channels = len(keep_idx)
    conv.in_channels = conv.groups * in_per_group


def slice_channelwise_(layer: nn.Module, keep_idx: torch.Tensor) -> None:
    """Keep channels `keep_idx` of a BatchNorm / InstanceNorm / LayerNorm / PReLU."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice(layer, name, 0, keep_idx)
    if isinstance(layer, nn.LayerNorm):
        layer.normalized_shape = (len(keep_idx),)
    elif isinstance(layer, nn.PReLU):
        layer.num_parameters = len(keep_idx)
    else:
        layer.num_features = len(keep_idx)


def slice_tensor_(root: nn.Module, path: str, dim: int, keep_idx: torch.Tensor) -> None:
    """Keep slices `keep_idx` along `dim` of the parameter or buffer at `path` under `root`."""
    prefix, _, name = path.rpartition(".")
    _slice(root.get_submodule(prefix) if prefix else root, name, dim, keep_idx)


@torch.no_grad()
def zero_outputs_(layer: nn.Module, dim: int, idx: torch.Tensor) -> None:
    """Zero output channels `idx` of a layer (weight along `dim`, and bias), in place."""
    layer.weight.index_fill_(dim, idx.to(layer.weight.device), 0.0)
    if getattr(layer, "bias", None) is not None:
        layer.bias.index_fill_(0, idx.to(layer.bias.device), 0.0)


@torch.no_grad()
def zero_channelwise_(layer: nn.Module, idx: torch.Tensor) -> None:
    """Zero the affine weight and bias of channels `idx` of a norm layer: its output is 0."""
    for name in ("weight", "bias"):
        if getattr(layer, name, None) is not None:
            getattr(layer, name).index_fill_(0, idx.to(getattr(layer, name).device), 0.0)


def padded(layer: nn.Module) -> bool:
    """True when a conv pads with zeros, so a constant input is not constant at its borders."""
    if not isinstance(layer, _CONVS):
        return False
    if isinstance(layer.padding, str):
        return layer.padding == "same" and any(k > 1 for k in layer.kernel_size)
    return layer.padding_mode == "zeros" and any(p > 0 for p in layer.padding)


@torch.no_grad()
def fold_constants_(layer: nn.Module, dim: int, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Add the contribution of input slices `idx`, constant at `values`, to the layer's bias.

    Exact for a Linear and for a conv without zero padding (every output sees the whole
    kernel window of the constant input); callers check `padded` first.

    Raises:
        CompressorError: The layer is a transposed conv, whose outputs see a varying number
            of input positions.
    """
    if isinstance(layer, _CONV_TRANSPOSES):
        raise CompressorError(f"cannot fold a constant input into a transposed conv ({layer})")
    columns = layer.weight.index_select(dim, idx.to(layer.weight.device))
    shape = [1] * columns.dim()
    shape[dim] = len(idx)
    values = values.view(shape).to(columns)
    contribution = (columns * values).flatten(1).sum(dim=1)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(contribution))
    layer.bias.add_(contribution)
