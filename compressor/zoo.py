"""Built-in architectures, looked up by name through a registry.

Every factory takes ``(in_channels, num_classes, input_size)`` plus its own keyword options
and returns a plain ``nn.Module`` built from standard layers, so that ``torch.fx`` can trace
it and ``torch.export`` can export it with a dynamic batch dimension. Callers seed torch's
global RNG for a deterministic initialisation; nothing here seeds it.

Use :func:`build` rather than calling a factory directly: it checks the name and options,
and records ``model.input_shape`` and ``model.arch`` so the model can be rebuilt later.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compressor.errors import InputError

ARCHS: dict[str, Callable[..., nn.Module]] = {}

# LeNet-5's classifier expects 50 maps of 4x4, which is what a 28x28 input gives.
_LENET5_SIZE = (28, 28)


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory under ``name``.

    Args:
        name: The key used by :func:`build` and the CLI's ``--arch``.

    Returns:
        A decorator that stores the factory in :data:`ARCHS` and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered (two factories would silently shadow).
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHS[name] = factory
        return factory

    return decorator


def list_archs() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(ARCHS)


def build(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int | tuple[int, int] = 28,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture.

    Args:
        name: A name from :func:`list_archs`.
        in_channels: Channels of one input image.
        num_classes: Width of the output logits.
        input_size: Image side, or ``(H, W)``, the model is built for.
        **kwargs: Options of that architecture (e.g. ``width`` for the ResNets).

    Returns:
        The model, with ``input_shape = (C, H, W)`` and ``arch`` (the arguments of this call,
        enough to rebuild it) set as attributes.

    Raises:
        InputError: On an unknown name, an option the architecture does not take, or a
            non-positive size.
    """
    if name not in ARCHS:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(list_archs())}")
    _check_options(name, kwargs)
    height, width = _hw(input_size)
    if in_channels < 1 or num_classes < 1:
        raise InputError(
            f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}"
        )
    model = ARCHS[name](in_channels, num_classes, (height, width), **kwargs)
    model.input_shape = (in_channels, height, width)
    # A list (e.g. read back from JSON) is stored as a tuple so the record compares equal.
    size = tuple(input_size) if isinstance(input_size, list | tuple) else input_size
    model.arch = {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_size": size,
        **kwargs,
    }
    return model


def _check_options(name: str, kwargs: dict[str, Any]) -> None:
    """Raise InputError if the factory of ``name`` does not take every key of ``kwargs``."""
    params = inspect.signature(ARCHS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in list(params)[3:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "no options"
        raise InputError(f"architecture {name!r} does not take {unknown}; it takes: {takes}")


def _hw(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise an int or ``(H, W)`` to ``(H, W)``, checking both are positive."""
    if isinstance(input_size, int):
        size = (input_size, input_size)
    elif isinstance(input_size, list | tuple) and len(input_size) == 2:
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise InputError(f"input_size must be an int or (H, W), got {input_size!r}")
    if min(size) < 1:
        raise InputError(f"input_size must be positive, got {input_size!r}")
    return size


def _scaled(channels: int, width: float) -> int:
    """Scale a channel count by a width multiplier, keeping at least one channel."""
    return max(1, round(channels * width))


# --- LeNets -------------------------------------------------------------------------------


@register_arch("lenet300")
def lenet300(in_channels: int, num_classes: int, input_size: int | tuple[int, int]) -> nn.Module:
    """LeNet-300-100 (LeCun et al. 1998): a 3-layer MLP on the flattened image."""
    height, width = _hw(input_size)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * height * width, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_arch("lenet5")
def lenet5(in_channels: int, num_classes: int, input_size: int | tuple[int, int]) -> nn.Module:
    """LeNet-5 in the 20-50-800-500 form of the GSS paper's supplement.

    The 800-wide classifier input is 50 maps of 4x4, which a 28x28 image gives. Other sizes
    are adapted inside the model so it takes the data as-is:

    * smaller than 28 in either side (e.g. 8x8 scikit-learn digits): an ``nn.Upsample`` to
      28x28 (bilinear) is the first layer. The resize is part of the model, so it exports to
      ONNX as a Resize node and the deployed model takes the original input size.
    * larger than 28: an ``nn.AdaptiveAvgPool2d((4, 4))`` before the flatten keeps it 800.
    """
    size = _hw(input_size)
    features = [
        nn.Conv2d(in_channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]
    if min(size) < _LENET5_SIZE[0]:
        features.insert(0, nn.Upsample(size=_LENET5_SIZE, mode="bilinear", align_corners=False))
    elif size != _LENET5_SIZE:
        features.append(nn.AdaptiveAvgPool2d((4, 4)))
    classifier = [nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes)]
    return nn.Sequential(*features, *classifier)


# --- CIFAR ResNets ------------------------------------------------------------------------


def _conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """Return a bias-free conv (a bias before BN is redundant) and its BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU.

    The shortcut is the identity (an empty ``nn.Sequential``) when the shape is kept, else a
    projection, conv1x1 with stride + BN (option B of He et al. 2016).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        same_shape = stride == 1 and c_in == c_out
        self.shortcut = (
            nn.Sequential() if same_shape else nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not `+=`: an in-place add on a traced value breaks autograd and fx rewriting.
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3 stages of ``n`` basic blocks."""

    def __init__(self, in_channels: int, num_classes: int, blocks: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = (_scaled(c, width) for c in (16, 32, 64))
        self.stem = nn.Sequential(*_conv_bn(in_channels, c1, 3), nn.ReLU())
        self.layer1 = _stage(c1, c1, blocks, stride=1)
        self.layer2 = _stage(c1, c2, blocks, stride=2)
        self.layer3 = _stage(c2, c3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, num_classes)
        _kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """Return ``blocks`` basic blocks; only the first one changes stride and width."""
    first = BasicBlock(c_in, c_out, stride)
    return nn.Sequential(first, *(BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)))


def _kaiming_init_(model: nn.Module) -> None:
    """Kaiming-normal init of every conv of ``model``, in place (He et al. 2015, fan-out)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@register_arch("resnet20")
def resnet20(
    in_channels: int, num_classes: int, input_size: int | tuple[int, int], *, width: float = 1.0
) -> nn.Module:
    """ResNet-20 (3 blocks per stage); ``width`` multiplies every channel count."""
    return CifarResNet(in_channels, num_classes, blocks=3, width=width)


@register_arch("resnet32")
def resnet32(
    in_channels: int, num_classes: int, input_size: int | tuple[int, int], *, width: float = 1.0
) -> nn.Module:
    """ResNet-32 (5 blocks per stage); ``width`` multiplies every channel count."""
    return CifarResNet(in_channels, num_classes, blocks=5, width=width)


@register_arch("resnet56")
def resnet56(
    in_channels: int, num_classes: int, input_size: int | tuple[int, int], *, width: float = 1.0
) -> nn.Module:
    """ResNet-56 (9 blocks per stage); ``width`` multiplies every channel count."""
    return CifarResNet(in_channels, num_classes, blocks=9, width=width)


# --- MobileNetV2 --------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. 2018
# Table 2 but cut to 4 stages and 64 channels: it must train on a 2-core CPU. Two stride-2
# stages only, since inputs are 8x8 to 32x32, not 224x224.
_MOBILENET_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1)]
_MOBILENET_LAST = 128  # 1280 in the paper; scaled down with the rest of the net.


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, linear project 1x1, residual if same shape."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers = [] if expansion == 1 else [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        # No activation after the projection: the paper's "linear bottleneck".
        layers += _conv_bn(hidden, c_out, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `use_residual` is fixed at construction, so fx and export see a static branch.
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


@register_arch("mobilenetv2")
def mobilenetv2(
    in_channels: int, num_classes: int, input_size: int | tuple[int, int], *, width: float = 1.0
) -> nn.Module:
    """A small MobileNetV2 (125k parameters at width 1); ``width`` scales every channel count.

    The stem has stride 1, unlike the paper's stride 2, because inputs here are small.
    """
    c_in = _scaled(16, width)
    layers = [*_conv_bn(in_channels, c_in, 3), nn.ReLU6()]
    for expansion, channels, repeats, stride in _MOBILENET_CONFIG:
        c_out = _scaled(channels, width)
        for i in range(repeats):
            layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
            c_in = c_out
    # As in torchvision, width < 1 does not shrink the last layer: it feeds the classifier.
    last = _scaled(_MOBILENET_LAST, max(1.0, width))
    layers += [*_conv_bn(c_in, last, 1), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes)]
    model = nn.Sequential(*layers)
    _kaiming_init_(model)
    return model
