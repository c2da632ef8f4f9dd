"""Tiny toy models with the topologies structured surgery must handle.

Each model takes `INPUT` (a 3x8x8 image batch) unless it says otherwise, is deterministic
under `torch.manual_seed`, and is small enough to trace, slim and export in well under a
second. BatchNorm layers get random statistics and affine parameters (`randomize_bn_`), so a
removed channel's BatchNorm shift is a nonzero constant unless zeroed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

INPUT = (3, 8, 8)


def randomize_bn_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running stats and affine params on every BatchNorm, in place (eval-time BN)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.normal_(0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.5, generator=generator)
                assert module.running_mean.shape == (n,)
    return model


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    )


class Head(nn.Module):
    """Global average pool + Linear classifier."""

    def __init__(self, channels: int, classes: int = 5):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    """Basic residual block; a projection shortcut (1x1 conv + BN) when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            conv_bn(c_in, c_out, 3, stride), nn.ReLU(), conv_bn(c_out, c_out)
        )
        same = stride == 1 and c_in == c_out
        self.shortcut = nn.Identity() if same else conv_bn(c_in, c_out, 1, stride)

    def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))


class ProjectionResidual(nn.Module):
    """Stem, a projection-shortcut block, an identity block, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.block1 = Block(6, 8, stride=2)
        self.block2 = Block(8, 8)
        self.head = Head(8)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


class RootResidual(nn.Module):
    """A residual add written in the root's own forward (slim_ returns a GraphModule)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.branch = nn.Sequential(conv_bn(8, 8), nn.ReLU(), conv_bn(8, 8))
        self.head = Head(8)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(x + self.branch(x)))


class NestedConcat(nn.Module):
    """Four branches joined by nested concatenation: cat(cat(a, b), cat(c, d))."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 3, 1)
        self.b = conv_bn(3, 4, 3)
        self.c = nn.Sequential(conv_bn(3, 2, 3), nn.ReLU(), conv_bn(2, 5, 3))
        self.d = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(3, 6, 1))
        self.mix = conv_bn(18, 7, 3)
        self.head = Head(7)

    def forward(self, x):
        left = torch.cat([self.a(x), self.b(x)], dim=1)
        right = torch.cat([self.c(x), self.d(x)], 1)
        return self.head(torch.relu(self.mix(torch.relu(torch.cat([left, right], 1)))))


class SplitConcatResidual(nn.Module):
    """Split a stream in two, transform each half, concatenate, add back to the stream."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.left = conv_bn(4, 4)
        self.right = conv_bn(4, 4)
        self.head = Head(8)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        low, high = torch.split(x, 4, dim=1)
        halves = torch.cat([self.left(low), self.right(high)], dim=1)
        return self.head(torch.relu(x + halves))


class ConcatNonChannel(nn.Module):
    """Concatenation along the height: channel c of both inputs is one channel."""

    def __init__(self):
        super().__init__()
        self.top = conv_bn(3, 6)
        self.bottom = conv_bn(3, 6)
        self.mix = conv_bn(6, 5)
        self.head = Head(5)

    def forward(self, x):
        tall = torch.cat([torch.relu(self.top(x)), torch.relu(self.bottom(x))], dim=2)
        return self.head(torch.relu(self.mix(tall)))


class Depthwise(nn.Module):
    """Expand 1x1, depthwise 3x3 (groups == channels), project 1x1."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(conv_bn(3, 12, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(conv_bn(12, 12, 3, groups=12), nn.ReLU6())
        self.project = conv_bn(12, 6, 1)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.project(self.depthwise(self.expand(x))))


class OneChannel(nn.Module):
    """A conv with a single output channel (groups=1, not depthwise) feeding a conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.squeeze = nn.Conv2d(6, 1, 3, padding=1)
        self.expand = conv_bn(1, 4)
        self.head = Head(4)

    def forward(self, x):
        return self.head(torch.relu(self.expand(torch.sigmoid(self.squeeze(self.stem(x))))))


class FlattenLinear(nn.Module):
    """Conv features flattened into a Linear with a literal view size (8 * 4 * 4)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.features(x).view(-1, 8 * 4 * 4)
        return self.fc2(torch.relu(self.fc1(x)))


class UnusedParameter(nn.Module):
    """Holds a layer and a parameter its forward never uses."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.unused_layer = nn.Conv2d(6, 6, 3)
        self.unused = nn.Parameter(torch.randn(6))
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.stem(x))


class MultiIO(nn.Module):
    """Two image inputs, two outputs (a tuple): logits and a feature map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.b = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.mix = nn.Sequential(conv_bn(6, 4), nn.ReLU())
        self.head = Head(4)

    def forward(self, x, y):
        features = self.mix(self.a(x) * self.b(y))
        return self.head(features), features.mean(1, keepdim=True)


class ChannelScale(nn.Module):
    """Per-channel parameters outside layers: `x * scale` and a PReLU with one slope per channel."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)
        self.act = nn.PReLU(6, init=0.1)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.act(self.stem(x) * self.scale))


class SharedConv(nn.Module):
    """One conv applied to two feature maps (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.b = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.shared = nn.Conv2d(6, 4, 3, padding=1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(torch.relu(self.shared(self.a(x)) + self.shared(self.b(x))))


class LayerNormMLP(nn.Module):
    """MLP with a LayerNorm over the hidden features (input: a flat vector of 12)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class ShapeBranch(nn.Module):
    """A Python branch on an input size: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.block = Block(6, 6)
        self.head = Head(6)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = self.stem(x)
        return self.head(self.block(x))


class DataBranch(nn.Module):
    """A branch on tensor values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 6)
        self.head = Head(6)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x)


class Flipped(nn.Module):
    """Reverses the channel order with an op surgery has no rule for (torch.fliplr)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.mix = conv_bn(6, 4)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.mix(torch.fliplr(self.stem(x))))


class BiasToLinear(nn.Module):
    """conv-BN-ReLU into a 1x1 conv (no padding) and, through pooling, a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.pointwise(self.stem(x)).mean((2, 3)))


class BiasToPadded(nn.Module):
    """conv-BN-ReLU into a zero-padded 3x3 conv: a removed channel's constant cannot fold."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 6), nn.ReLU())
        self.mix = conv_bn(6, 4)
        self.head = Head(4)

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.stem(x))))


class ResidualConst(nn.Module):
    """A residual stream without ReLU: removed channels carry BN shifts into the adds."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 6, 1)
        self.delta1 = conv_bn(6, 6, 1)
        self.delta2 = conv_bn(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.delta1(x)
        x = x + self.delta2(x)
        return self.fc(x.mean((2, 3)))


TOPOLOGIES = {
    "projection_residual": ProjectionResidual,
    "root_residual": RootResidual,
    "nested_concat": NestedConcat,
    "split_concat_residual": SplitConcatResidual,
    "concat_non_channel": ConcatNonChannel,
    "depthwise": Depthwise,
    "one_channel": OneChannel,
    "flatten_linear": FlattenLinear,
    "unused_parameter": UnusedParameter,
    "multi_io": MultiIO,
    "channel_scale": ChannelScale,
    "shared_conv": SharedConv,
    "shape_branch": ShapeBranch,
}


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for any model above (MultiIO takes two images, LayerNormMLP a vector)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, LayerNormMLP):
        return (torch.randn(batch, 12, generator=generator),)
    count = 2 if isinstance(model, MultiIO) else 1
    return tuple(torch.randn(batch, *INPUT, generator=generator) for _ in range(count))


def masked_reference(
    model: nn.Module, removed: dict[str, torch.Tensor], zero_norms: bool = True
) -> nn.Module:
    """The oracle for slimming: a copy of `model` with channels zeroed by forward hooks.

    `removed[fqn]` are output channels of layer `fqn` forced to zero at its output (dim 1,
    or the last dim of a Linear). With `zero_norms`, a BatchNorm/LayerNorm applied directly to
    such an output zeroes the same channels of its own output, i.e. the channel is gated after
    its norm (what BAR's gates, or `mask_(..., norms=True)`, give).
    """
    reference = copy.deepcopy(model).eval()
    masked: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for fqn, idx in removed.items():
        layer = reference.get_submodule(fqn)
        axis = -1 if isinstance(layer, nn.Linear) else 1
        layer.register_forward_hook(_zero_hook(idx.long(), axis, masked))
    if zero_norms:
        for module in reference.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
                module.register_forward_hook(_norm_hook(masked))
    return reference


def _zero_hook(idx: torch.Tensor, axis: int, masked: dict):
    def hook(module, inputs, out):
        out = out.index_fill(axis, idx, 0.0)
        masked[id(out)] = (out, idx, axis)  # keeps `out` alive, so its id stays unique
        return out

    return hook


def _norm_hook(masked: dict):
    def hook(module, inputs, out):
        entry = masked.get(id(inputs[0]))
        if entry is None or entry[0] is not inputs[0]:
            return out
        return out.index_fill(entry[2], entry[1], 0.0)

    return hook


# --- branch models-guard: destroyed models -------------------------------------------


class ZeroHead(nn.Module):
    """An MLP whose last layer's weights are all zero: its output is the bias, whatever the
    input (what a collapsed classifier looks like)."""

    def __init__(self, features: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU())
        self.head = nn.Linear(32, classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.linspace(-1.0, 1.0, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
