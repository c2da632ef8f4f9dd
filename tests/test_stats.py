import pytest
import torch
from torch import nn

from compressor import zoo
from compressor.stats import measure

# ResNet-20 (projection shortcuts) on a 3x32x32 input, MACs per sample, counted by hand:
RESNET20_MACS = (
    32 * 32 * 16 * (3 * 9)  # stem conv 3->16
    + 6 * (32 * 32 * 16 * (16 * 9))  # stage 1: 3 blocks x 2 convs 16->16 at 32x32
    + 16 * 16 * 32 * (16 * 9)  # stage 2 first conv 16->32, stride 2 -> 16x16
    + 5 * (16 * 16 * 32 * (32 * 9))  # stage 2 remaining 5 convs 32->32
    + 16 * 16 * 32 * 16  # stage 2 projection 1x1 16->32
    + 8 * 8 * 64 * (32 * 9)  # stage 3 first conv 32->64 -> 8x8
    + 5 * (8 * 8 * 64 * (64 * 9))  # stage 3 remaining 5 convs
    + 8 * 8 * 64 * 32  # stage 3 projection 1x1 32->64
    + 64 * 10  # fc
)  # = 40,813,184


def test_resnet20_flops_match_hand_count():
    model = zoo.build("resnet20", in_channels=3, num_classes=10, input_size=32)
    stats = measure(model, torch.zeros(1, 3, 32, 32))
    assert RESNET20_MACS == 40_813_184
    assert abs(stats.flops - RESNET20_MACS) / RESNET20_MACS < 0.01
    assert stats.params == sum(p.numel() for p in model.parameters())


def test_lenet300_counts_exact():
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=28)
    stats = measure(model, torch.zeros(1, 1, 28, 28))
    assert stats.flops == 784 * 300 + 300 * 100 + 100 * 10
    assert stats.volume == 300 + 100 + 10
    assert stats.prunable_params == 784 * 300 + 300 * 100 + 100 * 10
    assert stats.sparsity == 0.0


def test_sparsity_and_kept_channels():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[0].weight[1] = 0  # one dead output channel
        model[3].weight[:, :10] = 0
    stats = measure(model, torch.zeros(1, 2, 8, 8))
    conv = stats.layers[0]
    assert (conv.channels, conv.kept_channels) == (4, 3)
    assert conv.flops == 6 * 6 * 4 * 2 * 9
    assert conv.volume == 4 * 6 * 6
    assert stats.prunable_params == 4 * 2 * 9 + 3 * 144
    assert stats.prunable_params - stats.prunable_nonzero == 18 + 30
    assert stats.sparsity == pytest.approx(48 / (72 + 432))


def test_measure_restores_training_mode():
    model = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=8).train()
    measure(model, torch.zeros(1, 1, 8, 8))
    assert model.training


def test_measure_keeps_per_module_training_flags():
    model = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=8).train()
    model.layer1[0].bn1.eval()  # a frozen BatchNorm inside a model in training mode
    measure(model, torch.zeros(1, 1, 8, 8))
    assert model.training and not model.layer1[0].bn1.training
