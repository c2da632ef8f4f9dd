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


# --- trust-pt2: a model with a lifted tensor constant; a flatten-by-view CNN ----------


class ConstNet(nn.Module):
    """Linear plus a plain tensor attribute, which torch.export stores as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.offset = torch.linspace(-1.0, 1.0, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + self.offset


class ViewFlattenNet(nn.Module):
    """A digits CNN that flattens with `x.view(x.shape[0], -1)`, frozen by a static export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.shape[0], -1))


class FoldedBatchNet(nn.Module):
    """Folds the batch into rows (`view(B * 8, 8)`): a static export of it cannot be freed."""

    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Linear(8, 4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.row(x.reshape(x.shape[0] * 8, 8))
        return self.fc(rows.reshape(x.shape[0], -1))


# --- models-multiout: multi-output models (face-detector stages) ---


class FaceStage(nn.Module):
    """An MTCNN R-Net-like stage on 1x8x8 digits: conv -> PReLU -> max-pool stacks, two heads.

    Returns a tuple (cls logits over 10 classes, 4 box offsets); `as_dict=True` returns
    {"cls": ..., "box": ...} instead. Trains on digits through the cls head.
    """

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.PReLU(8),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(8, 16, 3, padding=1),
            nn.PReLU(16),
            nn.MaxPool2d(2),  # 2x2
            nn.Conv2d(16, 24, 2),
            nn.PReLU(24),
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(24, 32), nn.PReLU(32))
        self.cls = nn.Linear(32, 10)
        self.box = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor):
        h = self.trunk(self.features(x))
        cls, box = self.cls(h), self.box(h)
        return {"cls": cls, "box": box} if self.as_dict else (cls, box)


# --- trust-outputs: a model with an op the ONNX exporter cannot convert ------------------------


class RunningMax(nn.Module):
    """Running maximum along features: aten::cummax, which torch.onnx (dynamo) cannot convert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=1).values


class CummaxNet(nn.Module):
    """Flatten -> Linear -> RunningMax -> Linear on 8x8 images; the cummax sits at body.2."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), RunningMax(), nn.Linear(16, 10))
        self.input_shape = (1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --- models-mixed: standard architectures for mixed residual mode ---------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-BN-ReLU-conv-BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ImageNetResNet18(nn.Module):
    """ResNet-18 in torchvision's layout (7x7/2 stem, 3x3/2 max-pool, 4 stages of 2
    BasicBlocks, 1x1 downsample shortcuts, adaptive avg-pool, fc), `base` channels wide."""

    input_shape = (1, 32, 32)

    def __init__(self, base: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [base, 2 * base, 4 * base, 8 * base]
        c_in, stages = base, []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvReluBnPool(nn.Module):
    """An audio-style stack: (conv -> ReLU -> BatchNorm -> max-pool) x 3, then a Linear."""

    input_shape = (1, 16, 16)

    def __init__(self, widths: tuple[int, ...] = (8, 12, 16), classes: int = 10):
        super().__init__()
        layers, c_in = [], 1
        for width in widths:
            layers += [
                nn.Conv2d(c_in, width, 3, padding=1),
                nn.ReLU(),
                nn.BatchNorm2d(width),
                nn.MaxPool2d(2),
            ]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 2 * 2, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class GatedStream(nn.Module):
    """Two residual streams; the first is also joined by a multiply (x * sigmoid(gate(x))),
    which only tied channels can slim, the second is a plain mixable stream."""

    input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.branch = nn.Sequential(conv_bn(8, 8), nn.ReLU(), conv_bn(8, 8))
        self.gate = conv_bn(8, 8, 1)
        self.down = conv_bn(8, 12, 1, 2)
        self.branch2 = nn.Sequential(conv_bn(12, 12), nn.ReLU(), conv_bn(12, 12))
        self.head = Head(12)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.branch(x)
        x = x * torch.sigmoid(self.gate(x))
        y = self.down(x)
        return self.head(torch.relu(y + self.branch2(y)))


class SigmoidPadded(nn.Module):
    """conv -> sigmoid -> padded conv: a removed channel reaches the padding as 0.5, so no
    decision that removes it slims exactly (there is no norm to zero it after)."""

    input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.sigmoid(self.conv1(x))).mean((2, 3)))


# --- models-onnx branch: graphs converted from ONNX, and a model torch.export cannot capture --
# The Onnx* modules mirror onnx2torch 1.5's (its node_converters), without depending on it: one
# custom module per ONNX op, most of them a line of plain torch ops.


def _onnx_div(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """onnx2torch's Div: a Python branch on the dtype, which torch.fx cannot trace."""
    if first.is_floating_point() or second.is_floating_point():
        return torch.div(first, second)
    return torch.div(first, second, rounding_mode="trunc")


class OnnxBinaryMathOperation(nn.Module):
    """onnx2torch's Add / Sub / Mul / Div."""

    def __init__(self, operation_type: str):
        super().__init__()
        functions = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _onnx_div}
        self.math_op_function = functions[operation_type]

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.math_op_function(first, second)


class OnnxHardSigmoid(nn.Module):
    def __init__(self, alpha: float = 1 / 6, beta: float = 0.5):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return torch.clip(input_tensor * self.alpha + self.beta, min=0.0, max=1.0)


class OnnxHardSwish(nn.Module):
    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor * torch.clip(input_tensor / 6 + 0.5, min=0.0, max=1.0)


class OnnxGlobalAveragePoolWithKnownInputShape(nn.Module):
    def __init__(self, input_shape: list[int]):
        super().__init__()
        self._x_dims = list(range(2, len(input_shape)))

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        def _forward() -> torch.Tensor:
            return torch.mean(input_tensor, dim=self._x_dims, keepdim=True)

        if torch.onnx.is_in_onnx_export():  # onnx2torch exports its own GlobalAveragePool here
            return _forward()
        return _forward()


class OnnxPadStatic(nn.Module):
    def __init__(self, pads: list[int], mode: str = "constant", constant_value: float = 0.0):
        super().__init__()
        self.pads, self.mode, self.constant_value = pads, mode, constant_value

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(input_tensor, self.pads, mode=self.mode, value=self.constant_value)


class OnnxConcat(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *input_tensors) -> torch.Tensor:
        return torch.cat(input_tensors, self.axis)


class OnnxFlatten(nn.Module):
    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, end_dim=self.axis - 1)
        return torch.flatten(x, start_dim=1)


class OnnxReshape(nn.Module):
    """onnx2torch's Reshape: a Python branch on a tensor, so torch.fx cannot trace into it."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        if torch.any(shape == 0):
            shape = [input_tensor.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return torch.reshape(input_tensor, torch.Size(shape))


def onnx_mobile(
    in_channels: int = 1, num_classes: int = 10, size: int = 8, reshape: bool = False
) -> torch.fx.GraphModule:
    """A MobileNetV3-style block as onnx2torch converts it: a GraphModule of Onnx* modules.

    Stem (pad, conv, BN, hard-swish, divide by a constant), expand 1x1, depthwise 3x3, squeeze-excite (pool, two
    1x1 convs, hard-sigmoid, multiply), project 1x1 with a residual add, a concat, head
    conv, pool, flatten (or, with `reshape`, onnx2torch's untraceable Reshape) and Linear.
    """
    layers = {
        "Pad_0": OnnxPadStatic([1, 1, 1, 1]),
        "Conv_1": nn.Conv2d(in_channels, 8, 3),
        "BatchNormalization_2": nn.BatchNorm2d(8),
        "HardSwish_3": OnnxHardSwish(),
        "Div_25": OnnxBinaryMathOperation("Div"),  # by a constant, as converted graphs do
        "Conv_4": nn.Conv2d(8, 16, 1),
        "BatchNormalization_5": nn.BatchNorm2d(16),
        "Relu_6": nn.ReLU(),
        "Conv_7": nn.Conv2d(16, 16, 3, padding=1, groups=16),
        "BatchNormalization_8": nn.BatchNorm2d(16),
        "Relu_9": nn.ReLU(),
        "GlobalAveragePool_10": OnnxGlobalAveragePoolWithKnownInputShape([2, 16, size, size]),
        "Conv_11": nn.Conv2d(16, 4, 1),
        "Relu_12": nn.ReLU(),
        "Conv_13": nn.Conv2d(4, 16, 1),
        "HardSigmoid_14": OnnxHardSigmoid(),
        "Mul_15": OnnxBinaryMathOperation("Mul"),
        "Conv_16": nn.Conv2d(16, 8, 1),
        "BatchNormalization_17": nn.BatchNorm2d(8),
        "Add_18": OnnxBinaryMathOperation("Add"),
        "Concat_19": OnnxConcat(axis=1),
        "Conv_20": nn.Conv2d(16, 24, 1),
        "HardSwish_21": OnnxHardSwish(),
        "GlobalAveragePool_22": OnnxGlobalAveragePoolWithKnownInputShape([2, 24, size, size]),
        "Flatten_23": OnnxReshape() if reshape else OnnxFlatten(1),
        "Gemm_24": nn.Linear(24, num_classes),
    }
    root = nn.Module()
    for name, layer in layers.items():
        root.add_module(name, layer)
    root.register_buffer("shape_const", torch.tensor([-1, 24]))
    root.register_buffer("div_const", torch.tensor(2.0))
    graph = torch.fx.Graph()
    x = graph.placeholder("input_1")
    out = {}

    def call(name, *args):
        out[name] = graph.call_module(name, args)
        return out[name]

    y = x
    for name in list(layers)[:4]:
        y = call(name, y)
    stem = call("Div_25", y, graph.get_attr("div_const"))
    y = stem
    for name in list(layers)[5:11]:
        y = call(name, y)
    s = call("HardSigmoid_14", call("Conv_13", call("Relu_12", call("Conv_11", call(
        "GlobalAveragePool_10", y)))))  # fmt: skip
    y = call("BatchNormalization_17", call("Conv_16", call("Mul_15", y, s)))
    y = call("Concat_19", call("Add_18", y, stem), stem)
    y = call("GlobalAveragePool_22", call("HardSwish_21", call("Conv_20", y)))
    flat = call("Flatten_23", y, graph.get_attr("shape_const")) if reshape else call(
        "Flatten_23", y)  # fmt: skip
    graph.output(call("Gemm_24", flat))
    return randomize_bn_(torch.fx.GraphModule(root, graph, "OnnxMobile"))


def onnx_mobile_reshape(in_channels: int = 1, num_classes: int = 10) -> torch.fx.GraphModule:
    """`onnx_mobile` with onnx2torch's Reshape before the classifier."""
    return onnx_mobile(in_channels, num_classes, reshape=True)


class GuardedMLP(nn.Module):
    """An MLP with an input-range guard: a Python branch on a tensor value.

    torch.export cannot capture it (the branch depends on data); torch.fx cannot trace it; the
    TorchScript ONNX exporter traces the branch that real inputs take.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if float(x.abs().max()) > 1e6:  # scale wild inputs down
            x = x / 1e6
        return self.fc2(torch.relu(self.fc1(x)))


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


# --- branch patterns-export: a BatchNorm net the TorchScript ONNX exporter folds ------------


class ConvBnPatternNet(nn.Module):
    """Two conv+BN blocks of the same shape and a classifier, on 4x6x6 inputs: the legacy
    ONNX exporter folds each BN into its conv and renames the weight (onnx::Conv_N), and
    two equal shapes make the match by zero positions choose between them."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(4, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.block2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        )
        self.block3 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.block1(x))
        x = torch.relu(self.block2(x))
        x = torch.relu(self.block3(x))
        return self.head(x.mean(dim=(2, 3)))


# --- branch patterns-masks: N:M / RxC pattern pruning ------------------------------------


class PatternNet(nn.Module):
    """A digits (1x8x8) CNN whose layers cover the pattern cases: conv1's 9 columns take no
    N:M and leave partial 1x4 blocks, conv2's 72 columns take 2:4 and 4:8, the classifier's
    10 rows leave partial 4x1 blocks."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class EqualLayers(nn.Module):
    """Five 32x32 Linear layers: 2:4 prunes 512 weights of each, so sparsity 0.4 is four
    layers exactly (the fifth stays dense)."""

    def __init__(self, width: int = 32, depth: int = 5):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
